"""Training-time augmentation on whole batches, with per-sample randomness.

torchvision's v2 transforms applied to a batched tensor draw one set of random parameters for
the whole batch (every image gets the same crop). Here each image gets its own crop offset and
flip, done with masks over the batch as airbench does: (2·pad+1)·2 masked copies per batch
instead of one Python call per image, which keeps augmentation a few percent of a CPU step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each side by `pad`, then crop back to the input size at a random offset drawn
    independently per sample (uniform over the 2·pad+1 positions on each axis)."""
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device="cpu").to(x.device)
    rows = torch.empty((n, x.shape[1], h, w + 2 * pad), dtype=x.dtype, device=x.device)
    for s in range(2 * pad + 1):
        mask = shifts[:, 0] == s
        rows[mask] = padded[mask, :, s:s + h, :]
    out = torch.empty_like(x)
    for s in range(2 * pad + 1):
        mask = shifts[:, 1] == s
        out[mask] = rows[mask, :, :, s:s + w]
    return out


def random_hflip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2, independently."""
    mask = (torch.rand(x.shape[0], generator=gen, device="cpu") < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, *, random_crop_on: bool, crop_padding: int, hflip: bool,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """Apply the switched-on augmentations to an N×C×H×W batch (any dtype)."""
    if random_crop_on:
        x = random_crop(x, crop_padding, gen)
    if hflip:
        x = random_hflip(x, gen)
    return x


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 N×C×H×W → float32, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s
