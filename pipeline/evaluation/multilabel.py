"""Multi-label metrics (task: multilabel), with scikit-learn: each image has a k-hot target
y (N×C, 0/1) and C independent probabilities sigmoid(logits / T); label c is predicted where
its probability is ≥ its own threshold, chosen on the validation split (`choose_thresholds`).

What is here: the per-label thresholds, headline metrics and a per-label table
(`multilabel_metrics`), the per-label expected calibration error, what temperature scaling does
on the test split, which label was said instead of a missed one (`error_cooccurrence`), the most
confident wrong answers, and the precision-recall curves of the labels. No torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from pipeline.calibration import binary_nll, sigmoid

ECE_BINS = 15            # equal-width probability bins for the per-label ECE (as the single-label one)
NO_POSITIVE_THRESHOLD = 0.5  # a label never true on the validation split: nothing to choose from
THRESHOLD_DECIMALS = 4   # thresholds are rounded, so params/metrics files are the same bytes anywhere
LOG_LOSS_CLIP = 1e-15    # probabilities are clipped to [ε, 1 − ε] for the log loss from probabilities
MAX_ERRORS = 24          # rows of most_confident_errors
MAX_PR_PANELS = 20       # labels drawn in pr_curves_figure (those with most positives)


def predict(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The k-hot prediction (N×C uint8): label c where its probability is ≥ thresholds[c]."""
    return (np.asarray(probs) >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.uint8)


def _operating_point(y: np.ndarray, p: np.ndarray, target) -> float:
    """The threshold rule of `choose_thresholds`, for one label with at least one positive."""
    precision, recall, scores = precision_recall_curve(y, p)  # scores: every distinct p, ascending
    precision, recall = precision[:-1], recall[:-1]  # the last point (P 1, R 0) has no score
    f1 = 2 * precision * recall / np.maximum(precision + recall, np.finfo(np.float64).tiny)
    best = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[-1])  # ties: the highest score (fewest positives)
    if target != "f1":
        reach = np.flatnonzero(precision >= target)
        best = int(reach[0]) if reach.size else best  # unreachable precision: the F1 choice
    chosen, lower = float(scores[best]), float(scores[best - 1]) if best else 0.0
    t = round((chosen + lower) / 2, THRESHOLD_DECIMALS)
    if t > chosen:  # rounding up passed the chosen score: round down instead
        t = round(t - 10.0 ** -THRESHOLD_DECIMALS, THRESHOLD_DECIMALS)
    return t


def choose_thresholds(y: np.ndarray, probs: np.ndarray, target: str | float = "f1") -> np.ndarray:
    """Each label's decision threshold (C floats), chosen on validation targets and probabilities.

    target="f1": the score (a distinct validation probability of the label) at which predicting
    "≥ score" gives the label's highest F1 (ties: the highest such score); target=p, a float in
    (0, 1]: the lowest score whose precision is ≥ p (more recall at the precision asked for), or
    the F1 choice where no score reaches p. The threshold is then the midpoint between that score
    and the next lower distinct validation probability (0 below the lowest), so the validation
    predictions are those chosen while a test probability between the two is not decided by a
    hair. Rounded to 4 decimals (down where the nearest would pass the chosen score): scores closer
    than 1e-4 to the midpoint may fall on its other side. A label with no positive gets 0.5."""
    if not (target == "f1" or (isinstance(target, (int, float)) and not isinstance(target, bool) and 0 < target <= 1)):
        raise ValueError(f"threshold target must be 'f1' or a precision in (0, 1], not {target!r}")
    y, probs = np.asarray(y).astype(bool), np.asarray(probs, dtype=np.float64)
    return np.array([_operating_point(y[:, c], probs[:, c], target) if y[:, c].any() else NO_POSITIVE_THRESHOLD
                     for c in range(y.shape[1])], dtype=np.float64)


def probability_log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary log loss over all N×C entries from probabilities clipped to [1e-15, 1 − 1e-15]
    (what `binary_nll` computes from logits, up to that clipping)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def ece_per_label(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Each label's expected calibration error of its binary probability (C floats): the
    probabilities go into `bins` equal-width bins (lo, hi] over [0, 1] (0 into the first, as in
    metrics.expected_calibration_error); ECE = Σ_b |B_b| / n · |mean y(B_b) − mean p(B_b)|, the
    gap of the reliability diagram. 0 for every label with no images."""
    y, probs = np.asarray(y, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    if n == 0:
        return np.zeros(c)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, probs, side="left") - 1, 0, bins - 1)
    ece = np.empty(c)
    for j in range(c):  # |B|/n · |mean y − mean p| = |Σ y − Σ p| / n within each bin
        gap = np.bincount(which[:, j], y[:, j], bins) - np.bincount(which[:, j], probs[:, j], bins)
        ece[j] = np.abs(gap).sum() / n
    return ece


def average_precisions(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each label's average precision (area under its precision-recall curve, scikit-learn's
    step-wise sum); NaN for a label with no positive (its precision is undefined at every
    threshold), which the macro mean then leaves out."""
    y = np.asarray(y)
    return np.array([average_precision_score(y[:, c], probs[:, c]) if y[:, c].any() else np.nan
                     for c in range(y.shape[1])], dtype=np.float64)


def multilabel_metrics(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                       classes: list[str]) -> tuple[dict, pd.DataFrame]:
    """(headline metrics, per-label table) on the test split at the validation thresholds.

    mAP needs no threshold: `map_macro` is the mean AP over labels with at least one positive
    (a label never true has no AP; NaN if no label has one), `map_micro` the AP of all N×C
    entries pooled. Precision, recall and F1 are scikit-learn's with `zero_division=0`: micro
    pools the entries (dominated by frequent labels), macro weights every label equally (a label
    never true nor predicted counts 0). `subset_accuracy`: images with every label right;
    `hamming_loss`: the fraction of wrong entries. The table: one row per label, its
    `positive_rate` the share of images where it is true (the AP of a random guess)."""
    y, probs = np.asarray(y).astype(np.uint8), np.asarray(probs, dtype=np.float64)
    if probs.shape != y.shape or len(thresholds) != y.shape[1] or len(classes) != y.shape[1]:
        raise ValueError(f"y {y.shape}, probs {probs.shape}, {len(thresholds)} thresholds and "
                         f"{len(classes)} classes do not agree")
    pred = predict(probs, thresholds)
    ap, ece = average_precisions(y, probs), ece_per_label(y, probs)
    metrics = {"map_macro": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
               "map_micro": float(average_precision_score(y, probs, average="micro")) if y.any() else float("nan")}
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, average=average, zero_division=0)
        metrics |= {f"f1_{average}": float(f), f"precision_{average}": float(p), f"recall_{average}": float(r)}
    metrics = {k: metrics[k] for k in ("map_macro", "map_micro", "f1_micro", "f1_macro", "precision_micro",
                                       "precision_macro", "recall_micro", "recall_macro")}
    n = len(y)
    metrics |= {"subset_accuracy": float(accuracy_score(y, pred)),
                "hamming_loss": float(hamming_loss(y, pred)),
                "log_loss": probability_log_loss(y, probs),
                "ece": float(ece.mean()),
                "labels_per_image": float(y.sum() / n) if n else 0.0,
                "predicted_labels_per_image": float(pred.sum() / n) if n else 0.0,
                "n_test": int(n)}
    p, r, f, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    per_label = pd.DataFrame({"label": list(classes), "ap": ap, "precision": p, "recall": r, "f1": f,
                              "threshold": np.asarray(thresholds, dtype=np.float64), "support": support.astype(int),
                              "positive_rate": support / n if n else np.zeros(len(classes)), "ece": ece})
    return metrics, per_label


def calibration_metrics(y: np.ndarray, logits: np.ndarray, t: float) -> dict:
    """The fitted temperature and what it does on the test split: the binary log loss and the
    mean per-label ECE of sigmoid(logits / T), beside the plain `log_loss` and `ece`."""
    return {"temperature": float(t),
            "log_loss_calibrated": binary_nll(logits, y, t),
            "ece_calibrated": float(ece_per_label(y, sigmoid(np.asarray(logits, dtype=np.float64) / t)).mean())}


def error_cooccurrence(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Which label the model said instead of a missed one (C×C int counts): [i, j] off the
    diagonal is the number of images where label i was missed (y 1, pred 0) and label j was
    falsely predicted (y 0, pred 1), an image counting once in every such pair; [i, i] is the
    number of images where i was missed and nothing was falsely predicted (a plain omission)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    missed, false = (y & ~pred).astype(np.int64), (~y & pred).astype(np.int64)
    counts = missed.T @ false  # the diagonal is 0 here: a label is never missed and false at once
    np.fill_diagonal(counts, (missed * ~false.any(axis=1, keepdims=True)).sum(axis=0))
    return counts


def most_confident_errors(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                          limit: int = MAX_ERRORS) -> pd.DataFrame:
    """The most confident wrong answers: columns image, label (indices), kind ("false positive" /
    "false negative"), probability. False positives by probability, highest first; false
    negatives by probability, lowest first; taken in turns (FP, FN, FP, …, the rest of the longer
    list once the other runs out) up to `limit` rows. Ties: image, then label order (stable)."""
    y, probs = np.asarray(y).astype(bool), np.asarray(probs, dtype=np.float64)
    pred = predict(probs, thresholds).astype(bool)
    fp, fn = np.argwhere(~y & pred), np.argwhere(y & ~pred)  # row-major: by image, then label
    fp = fp[np.argsort(-probs[fp[:, 0], fp[:, 1]], kind="stable")]
    fn = fn[np.argsort(probs[fn[:, 0], fn[:, 1]], kind="stable")]
    rows = []
    for k in range(max(len(fp), len(fn))):
        rows += [(*fp[k], "false positive")] if k < len(fp) else []
        rows += [(*fn[k], "false negative")] if k < len(fn) else []
    rows = rows[:limit]
    return pd.DataFrame({"image": np.array([r[0] for r in rows], dtype=int),
                         "label": np.array([r[1] for r in rows], dtype=int),
                         "kind": [r[2] for r in rows],
                         "probability": np.array([probs[r[0], r[1]] for r in rows], dtype=np.float64)})


def pr_curves_figure(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str],
                     path: Path) -> None:
    """Each label's precision-recall curve in its own small panel (AP and support in its title),
    the operating point at its threshold marked; at most MAX_PR_PANELS labels, those with most
    positives (ties: label order), most first, and the title says so when some are left out."""
    # the project's Agg backend and its reproducible PNG (imported here: metrics need no matplotlib)
    from pipeline.plots import plt, save

    y, probs = np.asarray(y).astype(bool), np.asarray(probs, dtype=np.float64)
    support = y.sum(axis=0)
    shown = np.argsort(-support, kind="stable")[:MAX_PR_PANELS]
    cols = max(1, min(5, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.5), squeeze=False, layout="constrained")
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, shown):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if not support[c]:
            ax.set_title(f"{classes[c]} (no positives)", fontsize=8)
            continue
        precision, recall, _ = precision_recall_curve(y[:, c], probs[:, c])
        ax.plot(recall, precision, drawstyle="steps-post", lw=1.2, color="tab:blue")
        said = probs[:, c] >= thresholds[c]
        tp = int((said & y[:, c]).sum())
        at_p, at_r = (tp / said.sum() if said.any() else 0.0), tp / support[c]
        ax.plot([at_r], [at_p], "o", color="tab:red", ms=5, label=f"≥ {thresholds[c]:.4g}")
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title(f"{classes[c]} (AP {average_precision_score(y[:, c], probs[:, c]):.3f}, n={support[c]})",
                     fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    cut = f": the {len(shown)} labels with most positives of {len(classes)}" if len(shown) < len(classes) else ""
    fig.suptitle(f"Precision-recall per label{cut} (dot: at its threshold)", fontsize=10)
    save(fig, path)


def error_cooccurrence_figure(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """`error_cooccurrence` as a heat map of counts: a row per missed label, a column per label
    said instead; the diagonal (outlined) counts misses with nothing said instead."""
    from pipeline.plots import plt, save

    k = len(classes)
    size = min(14.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    shown = np.ma.masked_equal(cm, 0)
    image = ax.imshow(shown, cmap="Reds", vmin=0, vmax=max(1, int(cm.max())))
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0, fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("label said instead (a false positive on the same image)")
    ax.set_ylabel("missed label (a false negative)")
    for i in range(k):
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="grey", lw=0.8))
    if k <= 20:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > 0.6 * cm.max() else "black")
    fig.colorbar(image, ax=ax, shrink=0.7, label="images")
    ax.set_title(f"Errors together (test, {int(cm.sum())} counts): row missed, column said instead;\n"
                 "diagonal: missed with nothing said instead", fontsize=9)
    save(fig, path)
