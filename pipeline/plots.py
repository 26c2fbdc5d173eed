"""Pictures a person looks at, the shared parts: image grids, grids of image pairs (original
beside augmented, image beside its Grad-CAM), learning curves, a curve with marks (the lr range
test), a note where there is nothing to draw. PNGs at DPI dots per inch, written atomically and
byte-identical for the same inputs (Agg, no timestamps). The evaluate stage's own:
pipeline.evaluation.figures."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import RendererAgg  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402

from pipeline.core.io import atomic_path  # noqa: E402

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


TITLE_PT, SUPTITLE_PT = 8, 10  # an image's title; a figure's
GAP = 0.1                       # inches: under each row of images, and around a figure's title
HEADER_IN = 0.22                # inches: a pair grid's column headers ("original", "augmented") over its first row


def text_inches(text: str, points: float) -> float:
    """The width in inches of `text` (its longest line) in matplotlib's font at `points`."""
    prop = FontProperties(size=points)
    return max(_renderer().get_text_width_height_descent(line, prop, ismath=False)[0]
               for line in text.split("\n")) / 72


@functools.cache
def _renderer() -> RendererAgg:
    return RendererAgg(1, 1, 72)  # at 72 dpi, a pixel is a point


def wrap_to(text: str, width_in: float, points: float = TITLE_PT) -> str:
    """`text` as it is where it fits `width_in`, else broken between words into lines that fit
    (a word wider than that stays whole)."""
    if text_inches(text, points) <= width_in:
        return text
    lines, line = [], ""
    for word in text.split(" "):
        joined = f"{line} {word}" if line else word
        if line and text_inches(joined, points) > width_in:
            lines.append(line)
            line = word
        else:
            line = joined
    return "\n".join([*lines, line])


def heading_inches(suptitle: str) -> float:
    """The height in inches a figure keeps above its grid for `suptitle`."""
    return (suptitle.count("\n") + 1) * SUPTITLE_PT * 1.25 / 72 + 2 * GAP


def fixed_grid(slots: int, cols: int, cell: tuple[float, float], aspect: float, titles: Sequence[str],
               suptitle: str, header: float = 0.0, right: float = 0.0) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure of `slots` image axes, `cols` a row, each in a cell of `cell` inches (width,
    height) under its title (wrapped to the cell), an image `aspect` (width / height) wide, as
    large as the cell leaves it; `suptitle` over the grid, `header` inches more over its first
    row, `right` inches to its right (a colour bar's). Laid out here, in inches: matplotlib's
    constrained layout and "tight" crop took more than half of each grid picture's time (about
    0.6 of 1.0 s for 24 pairs) and let long titles run into each other."""
    titles = [wrap_to(t, cell[0] - GAP) for t in titles]
    title_in = max((t.count("\n") + 1 for t in titles), default=1) * TITLE_PT * 1.2 / 72 + 0.06
    image_h = min(cell[1] - title_in - GAP, (cell[0] - GAP) / aspect)
    image_w = image_h * aspect
    rows, top = max(1, -(-slots // cols)), heading_inches(suptitle) + header
    width = max(cols * cell[0] + right, text_inches(suptitle, SUPTITLE_PT) + 2 * GAP)
    height = top + rows * cell[1]
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(suptitle, fontsize=SUPTITLE_PT, y=1 - GAP / height, va="top")
    x0 = (width - right - cols * cell[0]) / 2
    axes = []
    for slot in range(slots):
        row, col = divmod(slot, cols)
        left, below = x0 + col * cell[0] + (cell[0] - image_w) / 2, top + row * cell[1] + title_in + image_h
        ax = fig.add_axes((left / width, 1 - below / height, image_w / width, image_h / height))
        ax.axis("off")
        if slot < len(titles):  # y given: matplotlib then skips placing it by the axes' extent (0.3 s a grid)
            ax.set_title(titles[slot], fontsize=TITLE_PT, pad=2, y=1.0)
        axes.append(ax)
    return fig, axes


def image_grid(images: np.ndarray, titles: Sequence[str], path: Path, suptitle: str, cols: int = 8) -> None:
    """uint8 N×3×H×W images in a grid with a title over each, at most `cols` per row (fewer
    images: one row just as wide as they need, or as its title)."""
    cols = max(1, min(cols, len(images)))
    fig, axes = fixed_grid(len(images), cols, CELL, images.shape[-1] / images.shape[-2], titles, suptitle)
    for ax, img in zip(axes, images):
        ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
    save(fig, path, whole=True)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two uint8 3×H×W images → one H×(2W+gap)×3 picture, a white gap between them."""
    h, w = left.shape[1:]
    gap = np.full((h, max(1, w // 12), 3), 255, np.uint8)
    return np.concatenate([left.transpose(1, 2, 0), gap, right.transpose(1, 2, 0)], axis=1)


def pair_figure(lefts: np.ndarray, rights: np.ndarray, titles: Sequence[str], headers: tuple[str, str],
                suptitle: str, per_row: int = 4, colors: Sequence[str] | None = None,
                slots: Sequence[int] | None = None, right: float = 0.0) -> plt.Figure:
    """Pairs of uint8 N×3×H×W images, each pair in one panel (left beside right) under its title
    (in its colour), `per_row` pairs a row, `headers` naming left and right over the first row
    (none when both are empty), `suptitle` over all. `slots`: each pair's place in the grid
    (default 0, 1, 2, …; a caller can start a new row); `right`: inches kept free to the right.
    Save it with `save(fig, path, whole=True)`: its size is laid out (`fixed_grid`)."""
    slots = list(range(len(lefts))) if slots is None else list(slots)
    per_row = max(1, min(per_row, max(slots, default=0) + 1))
    h, w = lefts.shape[-2:]
    gap = max(1, w // 12)
    placed = [""] * (max(slots, default=0) + 1)
    for slot, title in zip(slots, titles):
        placed[slot] = title
    labelled = any(headers)
    fig, axes = fixed_grid(len(placed), per_row, PAIR, (2 * w + gap) / h, placed, suptitle,
                           header=HEADER_IN if labelled else 0.0, right=right)
    for i, slot in enumerate(slots):
        ax = axes[slot]
        ax.imshow(side_by_side(lefts[i], rights[i]), interpolation="nearest")
        if colors:
            ax.title.set_color(colors[i])
        if labelled and slot < per_row:  # the first row: column headers between the title and the images
            ax.axis("on")
            ax.title.set_y(1.0 + HEADER_IN / (ax.get_position().height * fig.get_figheight()))  # over the headers
            ax.set_xticks([(w - 1) / 2, w + gap + (w - 1) / 2], headers, fontsize=8, fontweight="bold")
            ax.xaxis.tick_top()
            ax.set_yticks([])
            ax.tick_params(length=0, pad=1)
            ax.spines[:].set_visible(False)
    for slot in sorted(set(range(len(placed))) - set(slots), reverse=True):
        axes[slot].remove()  # a place left empty (the row a caller started early)
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
