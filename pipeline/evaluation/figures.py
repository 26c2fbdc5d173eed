"""The evaluate stage's pictures: the confusion matrix, the most confident mistakes, Grad-CAM.

The confusion matrix is one panel at any class count: each cell's colour is the share of its
true class (row-normalised; blue on the diagonal, red off it on a square-root scale so that a
single error still shows), its text the count (and the share, while the cell has room). Empty
cells stay blank. The matrix grows with √classes up to CM_MAX_SIDE inches (10 classes: 6 in,
800 px in all; 100 classes: 0.15 in a cell, under 1800 px), fonts shrink with the cells, and
numbers are printed only where they fit (the counts are always in confusion_matrix.json).
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, PowerNorm

from pipeline.evaluation.metrics import normalize_rows
from pipeline.plots import HEADER_IN, heading_inches, image_grid, note_figure, pair_figure, plt, save

CM_MAX_SIDE = 15.0   # inches: the matrix itself at most (100 classes: 0.15 in = 11 pt a cell)
CM_SIDE_10 = 6.0     # inches: the matrix of 10 classes (0.6 in a cell); it grows with √classes
MIN_TEXT_PT = 6.0    # smaller numbers are not printed
CORRECT_CMAP = ListedColormap(plt.get_cmap("Blues")(np.linspace(0.15, 1.0, 256)), "correct")
ERROR_CMAP = ListedColormap(plt.get_cmap("Reds")(np.linspace(0.3, 1.0, 256)), "errors")  # the palest is visible


@dataclass(frozen=True)
class CmLayout:
    """Sizes of the confusion matrix for k classes, in inches and points."""
    side: float        # the matrix (square)
    base_pt: float     # caption, axis and colour bar labels
    cell_pt: float     # one cell
    label_pt: float    # class names on the axes
    text_pt: float     # numbers in the cells
    rotate: bool       # predicted-class names vertical (they do not fit across a cell)


def cm_layout(classes: Sequence[str]) -> CmLayout:
    k = max(len(classes), 1)
    side = min(CM_MAX_SIDE, max(3.0, CM_SIDE_10 * (k / 10) ** 0.5))
    cell_pt = side / k * 72
    label_pt = min(10.0, 0.7 * cell_pt)
    longest = max((len(c) for c in classes), default=1)
    return CmLayout(side, min(12.0, 7 + side / 3), cell_pt, label_pt, min(10.0, 0.4 * cell_pt),
                    0.6 * label_pt * longest > 0.9 * cell_pt)


def _share(fraction: float) -> str:
    return "<1%" if 0 < fraction < 0.01 else f"{100 * fraction:.0f}%"


def cell_text(count: int, fraction: float, cell_pt: float, text_pt: float) -> str:
    """What a cell says: nothing when empty or when the number does not fit; the count; and
    the share of the true class on a second line where the cell has room."""
    if count == 0 or text_pt < MIN_TEXT_PT:
        return ""
    two = f"{count}\n{_share(fraction)}"
    if 2.6 * text_pt <= 0.9 * cell_pt and 0.6 * text_pt * max(map(len, two.split("\n"))) <= 0.9 * cell_pt:
        return two
    return str(count) if 0.6 * text_pt * len(str(count)) <= 0.9 * cell_pt else ""


def _cell_colors(cm: np.ndarray) -> tuple[np.ma.MaskedArray, np.ma.MaskedArray]:
    """Row shares on the diagonal and off it, each masked (drawn blank) where the count is 0."""
    share, diag = normalize_rows(cm), np.eye(len(cm), dtype=bool)
    return np.ma.masked_where(~diag | (cm == 0), share), np.ma.masked_where(diag | (cm == 0), share)


def confusion_figure(cm: np.ndarray, classes: Sequence[str]) -> plt.Figure:
    """The confusion matrix as a figure (not yet saved); its axes: the matrix, then two colour bars."""
    lay = cm_layout(classes)
    label_in = 0.6 * lay.label_pt * max((len(c) for c in classes), default=1) / 72 + 0.5
    left, bottom, bar = label_in, (label_in if lay.rotate else 0.6), 0.15  # inches
    width, height = left + lay.side + 1.9, bottom + lay.side + 1.0
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, lay.side / width, lay.side / height))
    correct, errors = _cell_colors(cm)
    norms = Normalize(0, 1), PowerNorm(0.5, 0, 1)
    ax.imshow(correct, cmap=CORRECT_CMAP, norm=norms[0], interpolation="nearest", aspect="equal")
    ax.imshow(errors, cmap=ERROR_CMAP, norm=norms[1], interpolation="nearest", aspect="equal")
    _label_axes(ax, classes, lay)
    _write_counts(ax, cm, norms, lay)
    for i, (cmap, norm, what) in enumerate(((CORRECT_CMAP, norms[0], "correct"), (ERROR_CMAP, norms[1], "errors"))):
        x = left + lay.side + 0.2 + 0.95 * i  # inches
        _colour_bar(fig, fig.add_axes((x / width, bottom / height, bar / width, lay.side / height)), cmap, norm,
                    what, lay.base_pt)
    numbers = ("Numbers: images and share of the true class." if cell_text(1, 1.0, lay.cell_pt, lay.text_pt).count("\n")
               else "Numbers: images." if lay.text_pt >= MIN_TEXT_PT
               else "Cells too small for numbers: the counts are in confusion_matrix.json.")
    caption = (f"Confusion matrix (test, n={int(cm.sum())}). Colour: share of the true class (row); blue: correct, "
               f"red: errors (square-root scale, so that one error shows); blank: none. {numbers}")
    chars = int(110 / lay.base_pt * (lay.side + 1.9))  # a line across the figure
    ax.set_title(textwrap.fill(caption, width=chars), fontsize=lay.base_pt, loc="left")
    return fig


def _label_axes(ax, classes: Sequence[str], lay: CmLayout) -> None:
    k = len(classes)
    ax.set_xticks(range(k), classes, rotation=90 if lay.rotate else 0, fontsize=lay.label_pt)
    ax.set_yticks(range(k), classes, fontsize=lay.label_pt)
    ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.88", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("predicted class", fontsize=lay.base_pt)
    ax.set_ylabel("true class", fontsize=lay.base_pt)


def _colour_bar(fig: plt.Figure, cax, cmap, norm, what: str, size_pt: float) -> None:
    ticks = [0.01, 0.05, 0.1, 0.25, 0.5, 1] if isinstance(norm, PowerNorm) else [0, 0.25, 0.5, 0.75, 1]
    fig.colorbar(ScalarMappable(norm, cmap), cax=cax, ticks=ticks, format=lambda v, _: _share(v))
    cax.set_title(what, fontsize=size_pt - 1)
    cax.tick_params(labelsize=size_pt - 2)


def _write_counts(ax, cm: np.ndarray, norms, lay: CmLayout) -> None:
    """The text of each non-empty cell, white on dark colours."""
    share = normalize_rows(cm)
    for i, j in zip(*np.nonzero(cm)):
        text = cell_text(int(cm[i, j]), float(share[i, j]), lay.cell_pt, lay.text_pt)
        if text:
            cmap, norm = (CORRECT_CMAP, norms[0]) if i == j else (ERROR_CMAP, norms[1])
            r, g, b, _ = cmap(norm(share[i, j]))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=lay.text_pt, linespacing=1.1,
                    color="white" if dark else "black")


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    save(confusion_figure(cm, classes), path)


def misclassified_grid(images: np.ndarray, titles: Sequence[str], path: Path, n_test: int, cols: int = 6,
                       legend: str = "true → predicted (confidence)") -> None:
    """The given misclassified images (uint8 N×3×H×W) with their titles, in a grid no wider
    than they need; with none, a figure that says so (the file always exists, so DVC and
    MLflow always have it). `legend`: how to read a title."""
    if len(images):
        image_grid(images, titles, path, f"Most confident mistakes ({len(images)} shown)\n{legend}", cols=cols)
    else:
        note_figure(f"No misclassified images\n(all {n_test} test images are correct)", path)


HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5  # the heat map's weight over the grey image
BAR_IN = 1.0      # inches right of the Grad-CAM grid: its colour bar and the bar's label


def heat_overlay(images: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """uint8 N×3×H×W: each image in grey, its heat map (N×H×W in [0, 1]) in HEAT_CMAP over it."""
    grey = images.astype(np.float64).mean(axis=1, keepdims=True) / 255
    heat = plt.get_cmap(HEAT_CMAP)(heatmaps)[..., :3].transpose(0, 3, 1, 2)
    return np.round(255 * ((1 - HEAT_ALPHA) * grey + HEAT_ALPHA * heat)).astype(np.uint8)


def gradcam_grid_figure(images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], mistakes: np.ndarray,
                        per_row: int = 4, caption: str | None = None) -> plt.Figure:
    """Each image (uint8 N×3×H×W) beside its Grad-CAM overlay; the mistakes (a boolean per
    image, listed after the correct ones) start a new row and have red titles; one caption
    (`caption`, or one for classes) and one colour bar for the figure."""
    n_right = int((~mistakes).sum())
    first_wrong = -(-n_right // per_row) * per_row  # the mistakes start a row of their own
    slots = [i if i < n_right else first_wrong + i - n_right for i in range(len(images))]
    n_wrong = len(images) - n_right
    wrong = (f"then the {n_wrong} most confident mistakes (red: true → predicted (confidence))." if n_wrong
             else "no mistakes among the test images.")
    caption = caption or ("Grad-CAM: where the model finds the evidence for the class it predicted; each test image "
                          f"(left) beside its heat map over it in grey (right). {n_right} correct (black: class ✓ "
                          f"confidence), {wrong}")
    fig = pair_figure(images, heat_overlay(images, heatmaps), titles, ("image", "Grad-CAM"),
                      textwrap.fill(caption, width=int(14 * per_row * 2.5)), per_row,
                      colors=["tab:red" if m else "black" for m in mistakes], slots=slots, right=BAR_IN)
    # the bar's colours are the heat map's over mid-grey, as it shows on an average pixel
    bar = ListedColormap((1 - HEAT_ALPHA) * 0.5 + HEAT_ALPHA * plt.get_cmap(HEAT_CMAP)(np.linspace(0, 1, 256))[:, :3])
    width, height = fig.get_size_inches()
    grid_top = heading_inches(fig.get_suptitle()) + HEADER_IN
    bar_h = min(4.0, 0.8 * (height - grid_top))
    below = grid_top + (height - grid_top + bar_h) / 2
    cax = fig.add_axes(((width - 0.85) / width, 1 - below / height, 0.15 / width, bar_h / height), label="<colorbar>")
    fig.colorbar(ScalarMappable(Normalize(0, 1), bar), cax=cax, label="Grad-CAM weight (0: no evidence, 1: the strongest)")
    return fig


def gradcam_grid(images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], mistakes: np.ndarray,
                 path: Path, per_row: int = 4, caption: str | None = None) -> None:
    save(gradcam_grid_figure(images, heatmaps, titles, mistakes, per_row, caption), path, whole=True)


RELIABILITY_SIZE = (10.0, 4.4)  # inches, two panels


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy, mean confidence, count) per equal-width confidence bin, the bins of
    `expected_calibration_error`; empty bins are NaN with count 0."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    which = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        acc = np.bincount(which, weights=correct, minlength=bins) / count
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
    return acc, mean_conf, count


def reliability_diagram(y: np.ndarray, panels: list[tuple[str, np.ndarray, float]], path: Path, bins: int,
                        unit: str = "images") -> None:
    """Accuracy against confidence per bin, one panel per (title, probabilities, ECE): bars on
    the diagonal are calibrated; below it the model is over-confident. Each bar's width grows
    with its share of the images, so near-empty bins do not look important."""
    fig, axes = plt.subplots(1, len(panels), figsize=RELIABILITY_SIZE, squeeze=False, sharey=True)
    centres, width = (np.arange(bins) + 0.5) / bins, 1 / bins
    for ax, (title, probs, ece) in zip(axes.flat, panels):
        acc, conf, count = reliability_bins(probs, y, bins)
        share = count / max(count.sum(), 1)
        shown = count > 0
        ax.bar(centres[shown], acc[shown], width=width * (0.35 + 0.6 * share[shown] / share.max()),
               color="tab:blue", edgecolor="white", label="accuracy in the bin")
        ax.plot(conf[shown], acc[shown], "o", color="tab:red", ms=3, label="mean confidence → accuracy")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", title=f"{title}\nECE {ece:.4f}")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("accuracy")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability on the test split ({len(y):,} {unit}, {bins} bins; bar width ∝ {unit} in the bin)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, path)
