"""Pictures a person looks at, the shared parts: image grids, grids of image pairs (original
beside augmented, image beside its Grad-CAM), learning curves, a curve with marks (the lr range
test), a note where there is nothing to draw. PNGs at DPI dots per inch, written atomically and
byte-identical for the same inputs (Agg, no timestamps). The evaluate stage's own:
pipeline.evaluation.figures."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

DPI = 100
CELL = (1.3, 1.45)  # inches per image in a grid (width, height: room for a title)
PAIR = (2.5, 1.55)  # inches per pair of images in a pair grid (room for a title)


def save(fig: plt.Figure, path: Path, whole: bool = False) -> None:
    """The figure as a PNG at DPI, cropped to what it draws plus savefig's padding ("tight"); `whole`:
    a figure laid out in inches up to its edges (the pictures of a model's inside) keeps exactly
    its size plus the padding, without the extra layout pass "tight" takes (about 0.3 s each for
    the figures of 70 to 100 small axes; the same bytes, tests/test_inside.py)."""
    if whole:
        from matplotlib.transforms import Bbox

        pad = float(plt.rcParams["savefig.pad_inches"])
        box = Bbox.from_bounds(0, 0, *fig.get_size_inches()).padded(pad)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches=box if whole else "tight")
    plt.close(fig)


def image_grid(images: np.ndarray, titles: Sequence[str], path: Path, suptitle: str, cols: int = 8) -> None:
    """uint8 N×3×H×W images in a grid with a title over each, at most `cols` per row (fewer
    images: one row just as wide as they need)."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * CELL[0], rows * CELL[1]), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    save(fig, path)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two uint8 3×H×W images → one H×(2W+gap)×3 picture, a white gap between them."""
    h, w = left.shape[1:]
    gap = np.full((h, max(1, w // 12), 3), 255, np.uint8)
    return np.concatenate([left.transpose(1, 2, 0), gap, right.transpose(1, 2, 0)], axis=1)


def pair_figure(lefts: np.ndarray, rights: np.ndarray, titles: Sequence[str], headers: tuple[str, str],
                per_row: int = 4, colors: Sequence[str] | None = None,
                slots: Sequence[int] | None = None) -> plt.Figure:
    """Pairs of uint8 N×3×H×W images, each pair in one panel (left beside right) under its title
    (in its colour), `per_row` pairs a row, `headers` naming left and right over the first row.
    `slots`: each pair's place in the grid (default 0, 1, 2, …; a caller can start a new row)."""
    slots = list(range(len(lefts))) if slots is None else list(slots)
    per_row = max(1, min(per_row, max(slots, default=0) + 1))
    rows = max(slots, default=0) // per_row + 1
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * PAIR[0], rows * PAIR[1]), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    w = lefts.shape[-1]
    for i, slot in enumerate(slots):
        ax = axes.flat[slot]
        ax.imshow(side_by_side(lefts[i], rights[i]), interpolation="nearest")
        ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
        if slot < per_row:  # the first row: column headers between the title and the images
            ax.axis("on")
            ax.set_xticks([(w - 1) / 2, w + max(1, w // 12) + (w - 1) / 2], headers, fontsize=8, fontweight="bold")
            ax.xaxis.tick_top()
            ax.set_yticks([])
            ax.tick_params(length=0, pad=1)
            ax.spines[:].set_visible(False)
    return fig


def smooth(values, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average with weight `weight` on the
    past, debiased at the start (divided by 1 - weight^n) so the first points are not pulled
    towards zero; 0 returns the values as they are."""
    values = np.asarray(values, dtype=np.float64)
    if not weight:
        return values
    out, last = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        last = weight * last + (1 - weight) * v
        out[i] = last / (1 - weight ** (i + 1))
    return out


def learning_curves(history: pd.DataFrame, best_epoch: int, path: Path, smoothing: float = 0.0) -> None:
    """Train vs val loss and accuracy per epoch, best epoch marked; with `smoothing`, the
    moving averages drawn over the raw curves, which stay faint behind them."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            raw = history[f"{split}_{metric}"]
            if smoothing:
                ax.plot(history["epoch"], raw, "o-", color=color, alpha=0.25, ms=2, lw=1)
            ax.plot(history["epoch"], smooth(raw, smoothing), "-" if smoothing else "o-", color=color, ms=3,
                    label=split + (f" (smoothed {smoothing:g})" if smoothing else ""))
        if metric == "accuracy" and "val_map" in history:  # task=multilabel: its accuracy is per label
            ax.plot(history["epoch"], smooth(history["val_map"], smoothing), "s-", color="tab:green", ms=3,
                    label="val mAP (picks the epoch)")
        ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (per label) and mAP" if metric == "accuracy" and "val_map" in history else metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves" + (" (faint: raw values)" if smoothing else ""))
    save(fig, path)


def line_figure(x, y, path: Path, title: str, xlabel: str, ylabel: str, marks: dict[str, float] | None = None,
                logx: bool = False) -> None:
    """One curve, with labelled vertical marks (e.g. the suggested learning rate)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(x, y, "-", lw=1.5)
    for label, at in (marks or {}).items():
        ax.axvline(at, color="tab:red", ls="--", lw=1, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if marks:
        ax.legend()
    save(fig, path)


NOTE_SIZE = (5.0, 1.5)  # inches


def note_figure(text: str, path: Path) -> None:
    """A picture that only says something (why there is nothing to draw), so that a declared
    output always exists."""
    fig, ax = plt.subplots(figsize=NOTE_SIZE)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    save(fig, path)
