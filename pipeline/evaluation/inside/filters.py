"""`filters_figure`: the first convolution's filters as RGB pictures, and for channels of the
middle layer the input that maximises the channel's mean activation (`maximise_channels`: gradient
ascent from a grey image with jitter, L2 decay and blur, the "feature visualisation" recipe of
Olah et al., Distill 2017, in its simplest form)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation.inside.layers import (
    Layer,
    _axes,
    _evaluating,
    _frame,
    _note,
    _px,
    capture,
    early_middle_late,
    probe,
    spatial_layers,
)
from pipeline.core.preprocess import Preprocessing
from pipeline.plots import DPI, plt, save
from pipeline.text import shorten

if TYPE_CHECKING:
    from collections.abc import Iterator

# Gradient-ascent steps of the feature visualisation. A ResNet-18 trained on CIFAR-10 at 64 px: each channel
# shows the same pattern after 32 steps as after 48 (24 were visibly noisier), in 1.45 s instead of 2.2 on one
# thread, on the critical half of evaluate's two drawing processes (run.draw)
STEPS = 32
LR = 0.05             # Adam step, in normalised input units (the data's std)
DECAY = 0.01          # L2 decay: each step the image shrinks by this fraction towards grey
BLUR_EVERY = 4        # a Gaussian blur (σ = 0.5 px) every this many steps, not the last
VIS_MAX = 128         # px: the visualisation's canvas at most (a channel's patterns have the same size in
                      # pixels on any canvas: at 224 px they come out finer in the picture, for 3x the time)
MAX_FILTERS = 64      # first-convolution filters shown (the first ones)

# Layout, inches (the PNG adds savefig's padding: layers.PAD)
FIL = {"side": 0.25, "top": 0.75, "mid": 1.05, "bottom": 0.2, "cell": 0.5, "per_row": 16, "vis": 1.05, "vis_per_row": 8}


def filters_png_size(n_filters: int, channels: int) -> tuple[int, int]:
    """(width, height) px of filters.png for a first convolution of `n_filters` and `channels`
    visualised (0: none): 32 and 8 → (910, 445); 64 and 8 → (910, 545)."""
    w, h = _filter_inches(n_filters, channels)
    return _px(w), _px(h)


def _filter_inches(n_filters: int, channels: int) -> tuple[float, float]:
    f = FIL
    cols = max(1, min(n_filters, f["per_row"]))
    rows = -(-min(n_filters, MAX_FILTERS) // f["per_row"])
    vis_cols, vis_rows = min(channels, f["vis_per_row"]), -(-channels // f["vis_per_row"])
    width = 2 * f["side"] + max(cols * f["cell"], vis_cols * f["vis"])
    height = f["top"] + rows * f["cell"] + f["mid"] + vis_rows * (f["vis"] + 0.2) + f["bottom"]
    return width, height


def filters_figure(model: nn.Module, prep: Preprocessing, path: Path, channels: int = 8, steps: int = STEPS,
                   seed: int = 0) -> str | None:
    """Draw into `path` the first convolution's filters (each scaled to [0, 1]) and, for
    `channels` channels of the middle spatial layer (evenly spaced), the input that maximises
    the channel's mean activation (`maximise_channels`). The model is left as it was. Returns
    None, or a note of what could not be drawn: everything (no convolution: a note figure), or
    the visualisation (no spatial layer past the first convolution: its filters alone)."""
    found = probe(model, prep.image_size)
    first = next((layer for layer in found if layer.kind == "conv"), None)
    if first is None:
        return _note(f"Filters skipped: {type(model).__name__} has no convolution", path)
    weight = model.get_submodule(first.name).weight.detach().float().cpu().numpy()
    layers = spatial_layers(found)
    target = early_middle_late(layers)[1] if len(layers) >= 2 else None
    if target is None:
        _draw_filters(first, weight, None, None, 0, steps, path)
        return (f"Feature visualisation skipped: {type(model).__name__} has no spatial layer past its first "
                f"convolution {first.name} (e.g. a vision transformer); its filters are drawn")
    chosen = np.unique(np.linspace(0, target.shape[0] - 1, channels).round().astype(int))
    vis = (chosen, maximise_channels(model, target, chosen, prep, steps, seed))
    _draw_filters(first, weight, target, vis, channels, steps, path)
    return None


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter requiring a gradient; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with _evaluating(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _blur(img: torch.Tensor) -> torch.Tensor:
    """Gaussian blur, σ = 0.5 px (3×3 kernel), each channel on its own, edges replicated."""
    k1 = torch.tensor([0.1065, 0.7870, 0.1065], dtype=img.dtype, device=img.device)
    kernel = (k1[:, None] * k1[None, :]).expand(img.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=img.shape[1])


def maximise_channels(model: nn.Module, layer: Layer, chosen: np.ndarray, prep: Preprocessing, steps: int = STEPS,
                      seed: int = 0) -> np.ndarray:
    """For each channel in `chosen` of `layer`, the input (uint8 3×S×S; S the model's input
    size, at most VIS_MAX) that maximises its mean activation, taken before the layer's
    non-linearity (a channel that starts dead still has a gradient). Adam from grey plus faint
    seeded noise, all channels in one batch; each step a random shift of up to S/16 px, L2
    decay towards grey, every BLUR_EVERY steps a slight blur; clamped to real pixel values."""
    size, n = min(prep.image_size, VIS_MAX), len(chosen)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    img = (0.01 * torch.randn(n, 3, size, size, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([img], lr=LR)
    reach, rows = max(1, size // 16), torch.arange(n)
    with _frozen(model):
        for step in range(steps):
            dy, dx = torch.randint(-reach, reach + 1, (2,), generator=gen).tolist()
            shifted = torch.roll(img, (dy, dx), (2, 3)).to(device)
            (fmap,) = capture(model, shifted, [layer], before=layer.kind == "activation")
            loss = -fmap[rows, torch.as_tensor(chosen)].float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                img.mul_(1 - DECAY)
                if step % BLUR_EVERY == BLUR_EVERY - 1 and step < steps - 1:
                    img.copy_(_blur(img))
                img.copy_(torch.maximum(torch.minimum(img, hi), lo))
    pixels = (img.detach() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).numpy()


def _stretch(img: np.ndarray) -> np.ndarray:
    """uint8 3×H×W → H×W×3 floats, contrast stretched to its 1st–99th percentiles (display only)."""
    lo, hi = np.percentile(img, (1, 99))
    return np.clip((img.transpose(1, 2, 0).astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)


def _filter_rgb(w: np.ndarray) -> np.ndarray:
    """One filter (C×k×k) → k×k×3 in [0, 1], scaled by its own min and max (grey when C ≠ 3)."""
    w = w if w.shape[0] == 3 else np.repeat(w.mean(0, keepdims=True), 3, axis=0)
    span = w.max() - w.min()
    return ((w - w.min()) / span if span > 0 else np.full_like(w, 0.5)).transpose(1, 2, 0)


def _draw_filters(first: Layer, weight: np.ndarray, target: Layer | None, vis, channels: int, steps: int,
                  path: Path) -> None:
    """The filter grid on top; below it the visualisations `vis` (chosen channels, images) of
    `target`, or a line saying there is none."""
    f = FIL
    fig = plt.figure(figsize=_filter_inches(len(weight), channels))
    _frame(fig)
    fh = fig.get_size_inches()[1]
    rows = _draw_filter_grid(fig, first, weight)
    top = f["top"] + rows * f["cell"] + f["mid"]
    if vis is None:
        fig.text(0.5, 1 - (top - 0.4) / fh, "No spatial layer past the first convolution to visualise "
                 "(e.g. a vision transformer).", ha="center", va="bottom", fontsize=9)
    else:
        chosen, images = vis
        fig.text(0.5, 1 - (top - 0.45) / fh, f"What excites a channel of the middle layer "
                 f"{shorten(target.name, 30)} ({target.shape[0]} channels): the input maximising its mean\n"
                 f"activation, by {steps} steps of gradient ascent from grey on a {images.shape[-1]} px canvas "
                 "(jitter, L2 decay, blur)", ha="center", va="bottom", fontsize=9)
        per_row, step = f["vis_per_row"], f["vis"]
        for j, (ch, img) in enumerate(zip(chosen, images)):
            left, below = f["side"] + (j % per_row) * step, top + (j // per_row) * (step + 0.2)
            ax = _axes(fig, left, below, step - 0.08, step - 0.08)
            ax.imshow(_stretch(img), interpolation="nearest" if img.shape[-1] < 64 else "antialiased")
            ax.set_title(f"channel {ch}", fontsize=7, y=1.0)  # y given: not placed by the extent (slow)
    save(fig, path, whole=True)


def _draw_filter_grid(fig: plt.Figure, first: Layer, weight: np.ndarray) -> int:
    """The title and up to MAX_FILTERS filters, FIL["per_row"] a row, as one mosaic image (one
    axes, not one per filter: 64 axes took 0.65 s to make); returns the rows drawn."""
    f, n = FIL, len(weight)
    shown = min(n, MAX_FILTERS)
    what = f"all {n}" if shown == n else f"the first {shown} of {n}"
    k = "×".join(map(str, weight.shape[2:]))
    fig.text(0.5, 1 - 0.2 / fig.get_size_inches()[1], f"First convolution ({shorten(first.name, 30)}): {what} "
             f"filters, {k}, {weight.shape[1]} input channels\neach scaled to [0, 1] on its own (grey = 0.5)",
             ha="center", va="top", fontsize=9)
    cols, rows = min(shown, f["per_row"]), -(-shown // f["per_row"])
    ax = _axes(fig, f["side"], f["top"], cols * f["cell"] - MOSAIC_GAP, rows * f["cell"] - MOSAIC_GAP)
    ax.imshow(filter_mosaic([_filter_rgb(w) for w in weight[:shown]], cols), interpolation="nearest")
    return rows


MOSAIC_GAP = 0.04  # inches of white between two filters


def filter_mosaic(tiles: list[np.ndarray], cols: int) -> np.ndarray:
    """k×k×3 tiles in [0, 1] → one H×W×3 picture, `cols` a row, each tile resized (nearest) to
    its cell's pixels at plots.DPI less a white MOSAIC_GAP, so that it shows pixel for pixel."""
    cell, gap = round(FIL["cell"] * DPI), round(MOSAIC_GAP * DPI)
    side, rows = cell - gap, -(-len(tiles) // cols)
    out = np.ones((rows * cell - gap, cols * cell - gap, 3), dtype=np.float32)
    for i, tile in enumerate(tiles):
        ys, xs = np.arange(side) * tile.shape[0] // side, np.arange(side) * tile.shape[1] // side
        top, left = (i // cols) * cell, (i % cols) * cell
        out[top:top + side, left:left + side] = tile[ys][:, xs]
    return out
