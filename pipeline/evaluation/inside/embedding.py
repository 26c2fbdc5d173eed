"""`embedding_figure`: the penultimate features of the test images, PCA to ≤ 50 dimensions then
t-SNE to 2 (`tsne_2d`), coloured by true class, mistakes ringed."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.lines import Line2D
from torch import nn

from pipeline.core.preprocess import Preprocessing
from pipeline.evaluation.inside.layers import _axes, _frame, _note, _px
from pipeline.models import pre_logits
from pipeline.plots import plt, save
from pipeline.text import shorten

if TYPE_CHECKING:
    from collections.abc import Sequence

MIN_POINTS = 5        # fewer test images: no embedding
# t-SNE's gradient steps (scikit-learn's default is 1,000): on 845 CIFAR-10 test images' features
# 500 ended at KL divergence 0.944 against 0.933 after 1,000 (nearest neighbour of the same class
# 0.456 against 0.464), in 1.3 s instead of 2.5
TSNE_STEPS = 500

# Layout, inches (the PNG adds savefig's padding: layers.PAD)
EMB = {"width": 9.5, "height": 7.45, "left": 0.25, "side": 6.4, "top": 0.6}  # plot square, legend right
EMBEDDING_PNG_SIZE = (_px(EMB["width"]), _px(EMB["height"]))  # (970, 765) px at any class count


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """All indices when n ≤ max_points, else a seeded sample of max_points (sorted)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def penultimate(model: nn.Module, x: np.ndarray, prep: Preprocessing, batch_size: int = 64) -> np.ndarray:
    """Penultimate features (N×D float32, what the head sees) of stored uint8 N×3×S×S images,
    under the evaluation preprocessing, channels_last batches of 64 as `predict_logits`."""
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.array(x[start:start + batch_size])).to(device)
            xb = prep.model_input(xb).contiguous(memory_format=torch.channels_last)
            out.append(pre_logits(model, xb).flatten(1).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def tsne_2d(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """PCA to min(50, D, n) dimensions, then t-SNE (init PCA, perplexity min(30, (n-1)/3)):
    the n×2 points and a line naming the method. On one thread: the same points on any machine
    (no reduction whose order depends on the thread count), and on a shared 2-core CPU far
    faster (500 points: 1.5 s on one thread, 34 s on two contending with another job)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n, d = features.shape
    k = min(50, d, n)
    perplexity = min(30.0, (n - 1) / 3)
    with threadpool_limits(1):
        reduced = PCA(n_components=k, svd_solver="full", random_state=seed).fit_transform(features.astype(np.float64))
        points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed,
                      max_iter=TSNE_STEPS).fit_transform(reduced)
    return points, f"t-SNE (perplexity {perplexity:.3g}) of the penultimate features ({d} dims, PCA to {k})"


def embedding_figure(model: nn.Module, x: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     prep: Preprocessing, path: Path, seed: int = 0, max_points: int = 2000,
                     features: np.ndarray | None = None) -> str | None:
    """Draw into `path` the test images' penultimate features in 2-D (`tsne_2d`), coloured by
    true class, the model's mistakes (argmax of `probs` ≠ y) ringed in black; at most `max_points`
    images (a seeded sample). `features`: all N images' penultimate features where the caller
    has them (`predict_logits_and_features`), else computed here. Fewer than MIN_POINTS images: a
    note, also returned; else None."""
    if len(y) < MIN_POINTS:
        return _note(f"Embedding skipped: {len(y)} test images, fewer than {MIN_POINTS}", path)
    idx = subsample(len(y), max_points, seed)
    y_s = np.asarray(y)[idx]
    wrong = np.asarray(probs)[idx].argmax(1) != y_s
    feats = features[idx] if features is not None else penultimate(model, x[idx] if len(idx) < len(y) else x, prep)
    points, method = tsne_2d(feats, seed)
    sample = "all" if len(idx) == len(y) else f"a seeded sample of {len(idx):,} of {len(y):,}"
    title = f"{method}\n{len(idx):,} test images ({sample}), {int(wrong.sum()):,} misclassified (ringed)"
    _draw_embedding(points, y_s, wrong, list(classes), title, path)
    return None


def _colours(k: int) -> list:
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def _draw_embedding(points: np.ndarray, y: np.ndarray, wrong: np.ndarray, classes: list[str], title: str,
                    path: Path) -> None:
    e = EMB
    fig = plt.figure(figsize=(e["width"], e["height"]))
    _frame(fig)
    ax = _axes(fig, e["left"], e["top"], e["side"], e["side"])
    ax.spines[:].set_visible(True)
    colours, size = _colours(len(classes)), 14 if len(y) <= 600 else 7
    for c in range(len(classes)):
        at = y == c
        ax.scatter(points[at, 0], points[at, 1], s=size, color=colours[c], linewidths=0, alpha=0.85)
    ax.scatter(points[wrong, 0], points[wrong, 1], s=size * 3.5, facecolors="none", edgecolors="black",
               linewidths=0.8)  # a ring: the true class's colour still shows inside
    _label_classes(fig, ax, points, y, classes, colours, int(wrong.sum()))
    ax.set_title(title, fontsize=9)
    fig.text(0.5, 0.25 / e["height"], "Near points: images the model sees alike (t-SNE keeps neighbours; "
             "distances between clusters and cluster sizes mean little).", ha="center", fontsize=8, color="dimgrey")
    save(fig, path, whole=True)


def _label_classes(fig, ax, points, y, classes, colours, n_wrong: int) -> None:
    """A legend (≤ 20 classes) right of the plot; more classes: names at their points' medians
    where they do not overlap (`_label_spots`)."""
    e = EMB
    handles = [Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=7, label=f"misclassified ({n_wrong:,})")]
    if len(classes) <= 20:
        handles = [Line2D([], [], ls="", marker="o", color=colours[c], label=shorten(name, 22))
                   for c, name in enumerate(classes)] + handles
    else:
        for c, (mx, my) in _label_spots(ax, points, y):
            ax.text(mx, my, shorten(classes[c], 12), fontsize=6, ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": colours[c], "alpha": 0.8, "lw": 0.8})
    x0 = (e["left"] + e["side"] + 0.2) / e["width"]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(x0, 1 - e["top"] / e["height"]), fontsize=8,
               frameon=False, title="true class" if len(handles) > 1 else None, title_fontsize=8, alignment="left")


def _label_spots(ax, points: np.ndarray, y: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, its points' median) for names that fit: the tightest classes first, each kept
    only if its label (0.9 × 0.16 in) overlaps none already placed."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    box = np.array([0.9 * (x1 - x0), 0.16 * (y1 - y0)]) / EMB["side"]
    spots = []
    for c in np.unique(y):
        at = points[y == c]
        median = np.median(at, axis=0)
        spots.append((float(np.median(np.abs(at - median).sum(1) / box.sum())), int(c), median))
    placed: list[tuple[int, np.ndarray]] = []
    for _, c, median in sorted(spots, key=lambda s: (s[0], s[1])):
        if all((np.abs(median - other) >= box).any() for _, other in placed):
            placed.append((c, median))
    return placed
