"""The evaluate stage's pictures: the confusion matrix, the most confident mistakes, Grad-CAM."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.evaluation.metrics import normalize_rows
from pipeline.plots import CELL, image_grid, note_figure, plt, save


def confusion_size(k: int) -> tuple[float, float]:
    """Figure size (inches) of the two-panel confusion matrix for k classes."""
    side = max(4.0, 0.55 * k + 2)
    return 2 * side + 1.5, side


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Two panels: counts, and row-normalised (each true class's fraction per prediction)."""
    k = len(classes)
    norm = normalize_rows(cm)
    fig, axes = plt.subplots(1, 2, figsize=confusion_size(k), layout="constrained")
    for ax, values, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        vmax = max(int(cm.max()), 1) if fmt == "d" else 1
        im = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images" if fmt == "d" else "fraction of true class")
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title)
        if k <= 30:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] > 0.5 * vmax else "black")
    fig.suptitle(f"Confusion matrix (test, n={int(cm.sum())})")
    save(fig, path)


def misclassified_grid(images: np.ndarray, titles: Sequence[str], path: Path, n_test: int, cols: int = 6) -> None:
    """The given misclassified images (uint8 N×3×H×W) with their titles; with none, a figure
    that says so (the file always exists, so DVC and MLflow always have it)."""
    if len(images):
        image_grid(images, titles, path, f"Most confidently misclassified test images ({len(images)} shown)\n"
                   "true → predicted (confidence)", cols=cols)
    else:
        note_figure(f"No misclassified images\n(all {n_test} test images are correct)", path)


def gradcam_grid(images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], path: Path, pairs_per_row: int) -> None:
    """Each image (uint8 N×3×H×W) beside its Grad-CAM heat map (N×H×W in [0, 1]) overlaid in
    `jet`, `pairs_per_row` pairs per row (one class per row when that is the images per class)."""
    n = len(images)
    rows, cols = max(1, -(-n // pairs_per_row)), 2 * pairs_per_row
    fig, axes = plt.subplots(rows, cols, figsize=(cols * CELL[0], rows * CELL[1]), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, heat, title) in enumerate(zip(images, heatmaps, titles)):
        row, col = divmod(i, pairs_per_row)
        ax_img, ax_cam = axes[row, 2 * col], axes[row, 2 * col + 1]
        ax_img.imshow(img.transpose(1, 2, 0), interpolation="nearest")
        ax_img.set_title(title, fontsize=8)
        ax_cam.imshow(img.transpose(1, 2, 0).mean(axis=2), cmap="gray", interpolation="nearest")
        ax_cam.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        ax_cam.set_title("Grad-CAM", fontsize=8)
    fig.suptitle("Grad-CAM: where the model looks for its predicted class (true / predicted)", fontsize=10)
    save(fig, path)
