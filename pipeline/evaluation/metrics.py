"""Test-split metrics with scikit-learn: headline numbers, per-class table, confusion matrix,
calibration, and the choice of which test images to draw."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from pipeline.probabilities import softmax  # noqa: F401  (re-exported: one softmax)

ECE_BINS = 15        # equal-width confidence bins for the expected calibration error
TOP_K = 5            # top5_accuracy is reported only with more than TOP_K classes
MAX_MISCLASSIFIED = 24  # images in the misclassified grid
MAX_GRADCAM = 24     # images in the Grad-CAM figure: correct ones of each class, then mistakes


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error, the standard definition (Naeini et al. 2015; Guo et al. 2017):
    confidence = the top probability; images go into `bins` equal-width confidence bins
    (lo, hi] over [0, 1]; ECE = Σ_b |B_b| / n · |accuracy(B_b) − mean confidence(B_b)|."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in np.unique(which):
        in_bin = which == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Return (headline metrics from the predicted labels, per-class table, confusion matrix counts).

    Macro averages weight every class equally; weighted ones weight each class by its support.
    A class that is never predicted has precision 0 (scikit-learn's `zero_division=0`), which
    pulls the averages down, as it should. Balanced accuracy is the mean recall per class."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    metrics = {"accuracy": float(accuracy_score(y_true, y_pred)),
               "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        metrics |= {f"precision_{average}": float(pa), f"recall_{average}": float(ra), f"f1_{average}": float(fa)}
    metrics["n_test"] = int(len(y_true))
    per_class = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return metrics, per_class, cm


def probability_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics that need the predicted probabilities (N×K): log loss over all K classes, ECE,
    and top-5 accuracy when there are more than 5 classes."""
    labels = np.arange(probs.shape[1])
    metrics = {}
    if len(labels) > TOP_K:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=TOP_K, labels=labels))
    metrics["log_loss"] = float(log_loss(y_true, probs, labels=labels))
    metrics["ece"] = expected_calibration_error(probs, y_true)
    return metrics


KEY_ORDER = ("accuracy", "balanced_accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro",
             "precision_weighted", "recall_weighted", "f1_weighted", "log_loss", "ece", "n_test")


def evaluation_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Everything the evaluate stage reports: (metrics in KEY_ORDER, per-class table, confusion counts)."""
    label_metrics, per_class, cm = classification_metrics(y_true, probs.argmax(axis=1), classes)
    merged = label_metrics | probability_metrics(y_true, probs)
    return {k: merged[k] for k in KEY_ORDER if k in merged}, per_class, cm


def calibration_metrics(y_true: np.ndarray, logits: np.ndarray, temperature: float) -> dict:
    """The fitted temperature and what it does on the test split: log loss and ECE of
    softmax(logits / T), beside the plain `log_loss` and `ece`."""
    from pipeline.calibration import scaled

    probs = softmax(scaled(logits, temperature))
    return {"temperature": float(temperature),
            "log_loss_calibrated": float(log_loss(y_true, probs, labels=np.arange(probs.shape[1]))),
            "ece_calibrated": expected_calibration_error(probs, y_true)}


TTA_KEYS = ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "ece")  # reported again as <key>_tta


def tta_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """The headline metrics of test-time-augmented probabilities, named `<metric>_tta`."""
    merged, _, _ = evaluation_metrics(y_true, probs, classes)
    return {f"{k}_tta": merged[k] for k in TTA_KEYS}


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of a true class given each prediction); a class
    with no test image keeps a row of zeros."""
    return cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, limit: int = MAX_MISCLASSIFIED) -> np.ndarray:
    """Indices of misclassified images, most confident (top probability) first."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    return wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][:limit]


def gradcam_sample(y_true: np.ndarray, probs: np.ndarray, limit: int = MAX_GRADCAM) -> tuple[np.ndarray, np.ndarray]:
    """Which test images Grad-CAM explains: (indices, is_mistake). The most confidently correct
    images, taken in turn from each class (one of each, then a second of each, …) and grouped by
    class; then the most confident mistakes, up to a third of `limit` (more when too few are
    correct), most confident first."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    right = np.flatnonzero(pred == y_true)
    right = right[np.argsort(-conf[right], kind="stable")]
    rank = np.zeros(len(right), dtype=int)  # the place of each among its class's correct images
    for c in np.unique(y_true[right]):
        rank[y_true[right] == c] = np.arange(int((y_true[right] == c).sum()))
    wrong = most_confident_mistakes(y_true, probs, limit)
    n_right = min(len(right), limit - min(len(wrong), limit // 3))
    taken = np.lexsort((y_true[right], rank))[:n_right]  # in turns over the classes
    picked, picked_rank = right[taken], rank[taken]
    picked = picked[np.lexsort((picked_rank, y_true[picked]))]  # grouped by class, most confident first
    wrong = wrong[:limit - n_right]
    return np.concatenate([picked, wrong]).astype(int), np.arange(n_right + len(wrong)) >= n_right
