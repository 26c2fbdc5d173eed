"""Training-time augmentation on whole batches, with per-sample randomness.

torchvision's v2 transforms applied to a batched tensor draw one set of random parameters for
the whole batch (every image gets the same crop). Here each image gets its own crop (padded
or random-resized), flip, rotation/scale, colour jitter and erased box, all computed for the
batch at once with masks and batched ops (as airbench does for crops), on whatever device the
batch is on. Random numbers come from a CPU `torch.Generator`, so a seed gives the same
augmentation on any device. Padded crop and flip work on uint8 (cheap); the rest on float in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.params import AugmentParams
from pipeline.preprocess import center_crop

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_RRC_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to the whole image


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=gen)).to(device)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each side by `pad`, then crop back to the input size at a random offset drawn
    independently per sample: (2·pad+1)·2 masked copies per batch instead of one call per image."""
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).to(x.device)
    rows = torch.empty((n, x.shape[1], h, w + 2 * pad), dtype=x.dtype, device=x.device)
    for s in range(2 * pad + 1):
        mask = shifts[:, 0] == s
        rows[mask] = padded[mask, :, s:s + h, :]
    out = torch.empty_like(x)
    for s in range(2 * pad + 1):
        mask = shifts[:, 1] == s
        out[mask] = rows[mask, :, :, s:s + w]
    return out


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        gen: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's RandomResizedCrop, per sample, on a float batch: a box of scale × the area
    and aspect ratio in `ratio` (log-uniform) at a random position, resized to size×size. All
    boxes in one `roi_align` call: bilinear at each output pixel's centre, averaging
    ceil(box / size)² such samples where the box is larger than the output (antialiased)."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    area = _uniform(n * _RRC_TRIES, scale[0], scale[1], gen, "cpu").view(n, _RRC_TRIES) * (h * w)
    log_ratio = _uniform(n * _RRC_TRIES, math.log(ratio[0]), math.log(ratio[1]), gen, "cpu").view(n, _RRC_TRIES)
    bw = torch.sqrt(area * torch.exp(log_ratio)).round()
    bh = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (bw >= 1) & (bw <= w) & (bh >= 1) & (bh <= h)
    first = fits.float().argmax(1)
    take = torch.arange(n)
    bw = torch.where(fits.any(1), bw[take, first], torch.tensor(float(w)))
    bh = torch.where(fits.any(1), bh[take, first], torch.tensor(float(h)))
    top = (torch.rand(n, generator=gen) * (h - bh + 1)).floor()
    left = (torch.rand(n, generator=gen) * (w - bw + 1)).floor()
    boxes = torch.stack([take.float(), left, top, left + bw, top + bh], 1).to(x.device, x.dtype)
    return roi_align(x.contiguous(), boxes, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def random_hflip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2, independently."""
    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_affine(x: torch.Tensor, degrees: float, scale: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each float image by its own angle in [-degrees, degrees] and zoom by its own
    factor in [1-scale, 1+scale] about the centre (bilinear, black outside)."""
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, gen, x.device) * (math.pi / 180)
    zoom = _uniform(n, 1 - scale, 1 + scale, gen, x.device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors in [1-s, 1+s] on float [0, 1] images."""
    n = x.shape[0]
    b, c, s = (_uniform(n, 1 - strength, 1 + strength, gen, x.device).view(n, 1, 1, 1) for _ in range(3))
    x = (x * b).clamp_(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp_(0, 1)
    gray = _gray(x)
    return ((x - gray) * s + gray).clamp_(0, 1)


def random_erasing(x: torch.Tensor, p: float, fill: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """With probability p per sample, fill one random box (2-33 % of the area, aspect 0.3-3.3)
    with `fill` (C values: the data set's mean colour, i.e. 0 after normalisation)."""
    n, _, h, w = x.shape
    apply = (torch.rand(n, generator=gen) < p).to(x.device)
    area = _uniform(n, 0.02, 0.33, gen, x.device) * h * w
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), gen, x.device))
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (_uniform(n, 0, 1, gen, x.device) * (h - eh + 1)).floor()
    left = (_uniform(n, 0, 1, gen, x.device) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]
    return torch.where(mask, fill.to(x.device, x.dtype).view(1, -1, 1, 1), x)


def is_identity(cfg: AugmentParams, resized: bool = False) -> bool:
    return not (resized or (cfg.random_crop and cfg.crop_padding) or cfg.hflip or cfg.rotate_degrees or cfg.scale
                or cfg.color_jitter or cfg.random_erasing)


def augment_batch(x: torch.Tensor, cfg: AugmentParams, mean: list[float] | tuple[float, ...],
                  gen: torch.Generator | None = None, size: int | None = None,
                  resized: bool = False) -> torch.Tensor:
    """uint8 N×C×S×S batch (as prepare stored it) → augmented float32 N×C×size×size in [0, 1],
    not yet normalised. `resized`: a random-resized crop per image (scale and aspect ranges in
    `cfg`) instead of the centre crop plus padded random crop."""
    size = size or x.shape[-1]
    if resized:
        x = random_resized_crop(x.float().div_(255.0), size, tuple(cfg.resized_crop_scale),
                                tuple(cfg.resized_crop_ratio), gen)
        if cfg.hflip:
            x = random_hflip(x, gen)
    else:
        x = center_crop(x, size)
        if cfg.random_crop:
            x = random_crop(x, cfg.crop_padding, gen)
        if cfg.hflip:
            x = random_hflip(x, gen)
        x = x.float().div_(255.0)
    if cfg.rotate_degrees or cfg.scale:
        x = random_affine(x, cfg.rotate_degrees, cfg.scale, gen)
    if cfg.color_jitter:
        x = color_jitter(x, cfg.color_jitter, gen)
    if cfg.random_erasing:
        x = random_erasing(x, cfg.random_erasing, torch.tensor(mean), gen)
    return x
