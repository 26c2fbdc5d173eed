"""Training-time augmentation on whole batches, with per-sample randomness.

Ours, not torchvision's v2 or timm's transforms: on a batch those draw one set of random
parameters for all of it (every image gets the same crop), and image by image they cost a host
call per image. Here each image gets its own crop (padded or random-resized), flip,
rotation/scale, colour jitter and erased box, all computed for the batch at once with index
arithmetic and batched ops, on whatever device the batch is on. Random numbers are drawn on the
generator's device (training gives a GPU run a CUDA generator, so a step draws them there with
no copy from the host) and on a GPU nothing here reads a value back to the host or indexes with
a boolean mask (which waits for the device to count it): a step queues its kernels and goes on.
A CPU generator gives a CPU run the same numbers as ever.
Padded crop, flip and (on a CPU) the random-resized crop work on uint8 (cheap); the rest on
float in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.core.params import AugmentParams
from pipeline.core.preprocess import center_crop

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_RRC_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to the whole image


def _on(gen: torch.Generator | None) -> torch.device:
    """Where `gen` draws: random numbers are made there (the CPU for the global generator)."""
    return gen.device if gen is not None else torch.device("cpu")


def _rand(n: int, gen: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=_on(gen)).to(device)


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=gen, device=_on(gen))).to(device)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each side by `pad`, then crop back to the input size at a random offset drawn
    independently per sample: one gather with per-sample row and column indices (airbench's
    masked copies, `out[mask] = ...`, would make a GPU wait for each mask's count)."""
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device=_on(gen)).to(x.device)
    rows = (shifts[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]   # n×h×1
    cols = (shifts[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]   # n×1×w
    take = torch.arange(n, device=x.device)[:, None, None]
    # advanced indices on either side of a slice put their shape first: n×h×w×C
    return padded[take, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop's boxes for n images of h×w, as (left, top, width, height) in pixels,
    on the generator's device: the first of _RRC_TRIES draws that fits, else the whole image."""
    at = _on(gen)
    area = _uniform(n * _RRC_TRIES, scale[0], scale[1], gen, at).view(n, _RRC_TRIES) * (h * w)
    log_ratio = _uniform(n * _RRC_TRIES, math.log(ratio[0]), math.log(ratio[1]), gen, at).view(n, _RRC_TRIES)
    bw = torch.sqrt(area * torch.exp(log_ratio)).round()
    bh = torch.sqrt(area / torch.exp(log_ratio)).round()
    fits = (bw >= 1) & (bw <= w) & (bh >= 1) & (bh <= h)
    first = fits.float().argmax(1)
    take = torch.arange(n, device=at)
    bw = torch.where(fits.any(1), bw[take, first], float(w))
    bh = torch.where(fits.any(1), bh[take, first], float(h))
    top = (_rand(n, gen, at) * (h - bh + 1)).floor()
    left = (_rand(n, gen, at) * (w - bw + 1)).floor()
    return left, top, bw, bh


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        gen: torch.Generator | None = None, hflip: bool = False) -> torch.Tensor:
    """torchvision's RandomResizedCrop, per sample: uint8 N×C×H×W → float N×C×size×size in
    [0, 1]. A box of scale × the area and aspect ratio in `ratio` (log-uniform) at a random
    position (`crop_boxes`), resized to size×size; `hflip`: then mirrored left-right with
    probability 1/2 (drawn after the boxes, as `random_hflip` draws it).
    On a CPU each crop is resized from uint8 with antialiasing, bit for bit what torchvision's v2
    `resized_crop` gives a uint8 image (its vectorised uint8 kernel: 5 ms for 32 crops of 256 px
    to 224 on 2 cores, against 23 for `_sampled_crops`). Elsewhere (a GPU) all crops are one
    `_sampled_crops`: a per-crop call would read the boxes back to the host every step."""
    n, _, h, w = x.shape
    at = _on(gen)  # the boxes are worked out where the numbers are drawn
    left, top, bw, bh = crop_boxes(n, h, w, scale, ratio, gen)
    mirror = _rand(n, gen, at) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool, device=at)
    if x.device.type != "cpu":
        return _sampled_crops(x.float().div_(255.0), size, (left, top, bw, bh), mirror)
    x = x.contiguous(memory_format=torch.channels_last)  # the uint8 kernel's fast layout; the batch stays in it
    crops = []
    for i, (l, t, cw, ch, m) in enumerate(zip(*(v.long().tolist() for v in (left, top, bw, bh)), mirror.tolist())):
        crop = F.interpolate(x[i:i + 1, :, t:t + ch, l:l + cw], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)
        crops.append(crop.flip(-1) if m else crop)
    return torch.cat(crops).float().div_(255.0)


def _sampled_crops(x: torch.Tensor, size: int, boxes: tuple[torch.Tensor, ...], mirror: torch.Tensor) -> torch.Tensor:
    """Float crops of the (left, top, width, height) `boxes`, `mirror`ed where set, in one
    `grid_sample`: bilinear at each output pixel's centre, the points torchvision's `roi_align`
    samples (aligned, one sample per pixel), with no value read back to the host. It does not
    antialias a box larger than the output (prepare stores at most 1/crop_pct, ~1.14×, of it)."""
    n, _, h, w = x.shape
    left, top, bw, bh = boxes
    # the box in grid_sample's coordinates (-1 and 1: the image's outer edges): output pixel centre
    # u ∈ (-1, 1) samples the box's centre + u × its half-size; a negative x-scale mirrors it
    sx, sy = torch.where(mirror, -bw / w, bw / w), bh / h
    cx, cy = (2 * left + bw) / w - 1, (2 * top + bh) / h - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2, independently."""
    mask = _rand(x.shape[0], gen, x.device) < 0.5
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


_CONSTANTS: dict = {}  # (values, device, dtype) → tensor: made on a GPU once, not copied from the host every step


def _constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return _CONSTANTS[key]


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (x * _constant(_GRAY, x)).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors in [1-s, 1+s] on float [0, 1] images."""
    n = x.shape[0]
    b, c, s = (_uniform(n, 1 - strength, 1 + strength, gen, x.device).view(n, 1, 1, 1) for _ in range(3))
    x = (x * b).clamp_(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp_(0, 1)
    gray = _gray(x)
    return ((x - gray) * s + gray).clamp_(0, 1)


def random_erasing(x: torch.Tensor, p: float, fill: tuple[float, ...], gen: torch.Generator | None = None) -> torch.Tensor:
    """With probability p per sample, fill one random box (2-33 % of the area, aspect 0.3-3.3)
    with `fill` (C values: the data set's mean colour, i.e. 0 after normalisation)."""
    n, _, h, w = x.shape
    apply = _rand(n, gen, x.device) < p
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
    return torch.where(mask, _constant(tuple(float(v) for v in fill), x), x)


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
        x = random_resized_crop(x, size, tuple(cfg.resized_crop_scale),
                                tuple(cfg.resized_crop_ratio), gen, hflip=cfg.hflip)
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
        x = random_erasing(x, cfg.random_erasing, tuple(float(m) for m in mean), gen)
    return x
