"""`activations_figure`: the feature maps of an early, a middle and a late layer for the first
test image of each class (the channels of each layer varying most over those images, each channel
scaled to its own range over the images shown, so a column compares the classes)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
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
from pipeline.plots import plt, save
from pipeline.text import shorten

if TYPE_CHECKING:
    from collections.abc import Sequence

CHANNELS = 4          # feature maps shown per layer and image (the layer's most varied: `_top_channels`)

# Layout, inches (the PNG adds savefig's padding: layers.PAD)
ACT = {"left": 1.15, "top": 1.15, "bottom": 0.45, "right": 0.15, "cell": 0.62, "gap": 0.04, "group_gap": 0.3}


def activations_png_size(n_images: int, n_layers: int = 3) -> tuple[int, int]:
    """(width, height) px of activations.png: 10 classes, 3 layers → (1082, 840)."""
    w, h = _activation_inches(n_images, n_layers)
    return _px(w), _px(h)


def _activation_inches(n_images: int, n_layers: int) -> tuple[float, float]:
    a = ACT
    group = CHANNELS * a["cell"] + (CHANNELS - 1) * a["gap"]
    width = a["left"] + a["cell"] + n_layers * (a["group_gap"] + group) + a["right"]
    return width, a["top"] + n_images * (a["cell"] + a["gap"]) + a["bottom"]


def first_of_each_class(y: np.ndarray, max_classes: int) -> np.ndarray:
    """The index of the first image of each class present, classes in order, at most max_classes."""
    labels, first = np.unique(np.asarray(y), return_index=True)
    return first[np.argsort(labels)][:max_classes]


def activations_figure(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: Sequence[str],
                       prep: Preprocessing, path: Path, max_classes: int = 10) -> str | None:
    """Draw into `path` the input crop and CHANNELS feature maps (`_top_channels`) of an early, a
    middle and a late layer for the first image of each class (at most `max_classes`; stored
    uint8 N×3×S×S `x`). A model with no spatial maps gets a note, also returned; else None."""
    layers = spatial_layers(probe(model, prep.image_size))
    if len(layers) < 2:
        return _note(f"Activations skipped: {type(model).__name__} has no spatial feature maps past its input "
                     "(e.g. a vision transformer)", path)
    picked = early_middle_late(layers)
    idx = first_of_each_class(y, max_classes)
    crops = np.array(prep.center_crop(np.asarray(x[idx])))
    device = next(model.parameters()).device
    with torch.inference_mode(), _evaluating(model):
        maps = capture(model, prep.normalize(torch.from_numpy(crops).to(device)), picked)
    maps = [m.float().cpu().numpy() for m in maps]
    _draw_activations(crops, [classes[int(c)] for c in np.asarray(y)[idx]], picked, maps, path)
    return None


def _top_channels(fmap: np.ndarray) -> np.ndarray:
    """The CHANNELS channels that vary most over the images and positions shown (the most active
    on average are often saturated everywhere: flat pictures, e.g. ReLU6 at 6 in EfficientNet)."""
    return np.argsort(-fmap.std(axis=(0, 2, 3)), kind="stable")[:CHANNELS]


def _draw_activations(crops: np.ndarray, names: list[str], layers: list[Layer], maps: list[np.ndarray],
                      path: Path) -> None:
    a, n = ACT, len(crops)
    fig = plt.figure(figsize=_activation_inches(n, len(layers)))
    _frame(fig)
    row = a["cell"] + a["gap"]
    for i, (crop, name) in enumerate(zip(crops, names)):
        ax = _axes(fig, a["left"], a["top"] + i * row, a["cell"], a["cell"])
        ax.imshow(crop.transpose(1, 2, 0), interpolation="nearest")
        ax.set_ylabel(shorten(name, 14), rotation=0, ha="right", va="center", fontsize=8)
        if i == 0:
            ax.set_title("input", fontsize=8, y=1.0)  # y given: not placed by the extent (slow)
    x0 = a["left"] + a["cell"]
    for role, layer, fmap in zip(("early", "middle", "late"), layers, maps):
        x0 += a["group_gap"]
        _draw_layer(fig, x0, f"{role}: {shorten(layer.name, 24)}", layer, fmap, n)
        x0 += CHANNELS * a["cell"] + (CHANNELS - 1) * a["gap"]
    fig.suptitle("Inside the model: feature maps of three layers, the first test image of each class",
                 y=1 - 0.2 / fig.get_size_inches()[1], fontsize=10, va="top")
    fig.text(0.5, 0.2 / fig.get_size_inches()[1], "Each column: one channel (of the layer's channels, those varying "
             "most over these images), scaled to its range over the column; bright = strong activation.",
             ha="center", va="center", fontsize=8, color="dimgrey")
    save(fig, path, whole=True)


def _draw_layer(fig: plt.Figure, x0: float, header: str, layer: Layer, fmap: np.ndarray, n: int) -> None:
    a = ACT
    c, h, w = layer.shape
    fig.text((x0 + (CHANNELS * (a["cell"] + a["gap"])) / 2) / fig.get_size_inches()[0],
             1 - (a["top"] - 0.3) / fig.get_size_inches()[1], f"{header}\n{c} channels, {h}×{w}",
             ha="center", va="bottom", fontsize=8)
    for j, ch in enumerate(_top_channels(fmap)):
        column = fmap[:, ch]
        lo, hi = float(column.min()), float(column.max())
        for i in range(n):
            step = a["cell"] + a["gap"]
            ax = _axes(fig, x0 + j * step, a["top"] + i * step, a["cell"], a["cell"])
            ax.imshow(column[i], cmap="inferno", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if i == 0:
                ax.set_title(f"ch {ch}", fontsize=7, y=1.0)
