"""Prediction sets with a guarantee: split conformal prediction with the adaptive score APS
(Romano, Sesia & Candès 2020, "Classification with Valid and Adaptive Coverage").

An image's score is the probability mass of the classes ranked above its true class
(calibrated softmax probabilities, most probable first): APS with u = 0, so that the same image
always gets the same set. On n images the model did not train on (the validation split: see
`calibration_scores`), q̂ is the ⌈(n + 1)(1 − α)⌉-th smallest score; a new image's set holds
every class whose preceding mass is at most q̂: the most probable class always, then down the
ranking. The true class is in the set exactly when its score is at most q̂, so where the
calibration and new images are exchangeable the set holds it with probability ≥ 1 − α. Sets
are adaptive: one class where the model is sure, several where it is not. (APS as usually
stated, mass up to and *including* the class, with the class that crosses q̂ kept, never gives
less coverage but over-covers: 96 % for α = 0.1 on tests/test_conformal.py's synthetic data,
against 90 % here.) The test also checks this module against MAPIE's APS, given MAPIE's random
draws. numpy only: `pipeline predict` with an ONNX model imports no torch or scikit-learn.
"""
from __future__ import annotations

import math

import numpy as np

DECIMALS = 6  # stored scores and thresholds are rounded: the same bytes on any machine


def _order(probs: np.ndarray) -> np.ndarray:
    """Each row's classes, most probable first (ties: the lower class index first)."""
    return np.argsort(-probs, axis=1, kind="stable")


def aps_scores(probs: np.ndarray, labels: np.ndarray, u: float | np.ndarray = 0.0) -> np.ndarray:
    """Per image, the probability mass of its classes ranked above its label, plus `u` times its
    label's own (u = 0: the pipeline's; u uniform in [0, 1]: randomized APS, as MAPIE draws it)."""
    order = _order(probs)
    sorted_p = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p
    rank = np.argmax(order == np.asarray(labels)[:, None], axis=1)
    rows = np.arange(len(labels))
    return before[rows, rank] + np.asarray(u) * sorted_p[rows, rank]


def threshold(scores: np.ndarray, alpha: float) -> float:
    """q̂: the ⌈(n + 1)(1 − α)⌉-th smallest calibration score; above 1 (every class in every
    set) when n is too small for α (n < 1/α − 1)."""
    n = len(scores)
    k = math.ceil((n + 1) * (1 - alpha))
    return float(np.sort(scores)[k - 1]) if k <= n else math.inf


def prediction_sets(probs: np.ndarray, qhat: float, crossing: bool = False) -> np.ndarray:
    """N×K booleans: class k is in an image's set when the mass of the classes ranked above it
    is at most q̂ (the most probable class always is). `crossing`: below q̂ instead, so the
    class whose mass crosses q̂ is the last in (MAPIE's `include_last_label=True`, for scores
    with u > 0)."""
    order = _order(probs)
    sorted_p = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(sorted_p, axis=1) - sorted_p
    keep_sorted = before < qhat if crossing else before <= qhat + 1e-12  # q̂ is rounded to 6 decimals when stored
    keep_sorted[:, 0] = True
    sets = np.zeros_like(keep_sorted)
    np.put_along_axis(sets, order, keep_sorted, axis=1)
    return sets


def calibration_scores(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """The validation images' scores, sorted and rounded, as the checkpoint stores them: any α's
    threshold follows from them, so changing α does not retrain. The validation split chose the
    best epoch and the temperature too, which makes its scores slightly optimistic (coverage on
    test is reported beside α to show it); carving a separate calibration split would cost
    training or validation images."""
    return [round(float(s), DECIMALS) for s in np.sort(aps_scores(probs, labels))]


def coverage_metrics(sets: np.ndarray, labels: np.ndarray, alpha: float, qhat: float) -> dict:
    """Empirical coverage, set sizes (mean, median, the share of single-class sets) and how many
    images each size has, for eval.json."""
    sizes = sets.sum(axis=1)
    covered = sets[np.arange(len(labels)), labels]
    return {"conformal_alpha": float(alpha), "conformal_threshold": round(float(min(qhat, 1.0)), DECIMALS),
            "coverage": float(covered.mean()), "set_size_mean": float(sizes.mean()),
            "set_size_median": float(np.median(sizes)), "singleton_share": float((sizes == 1).mean()),
            "set_size_counts": {str(int(k)): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))}}


def per_class_coverage(sets: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, mean set size) per true class (NaN for a class with no image)."""
    covered = sets[np.arange(len(labels)), labels].astype(np.float64)
    sizes = sets.sum(axis=1).astype(np.float64)
    count = np.bincount(labels, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.bincount(labels, covered, n_classes) / count, np.bincount(labels, sizes, n_classes) / count)


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Abstention by confidence: images sorted by top probability, most confident first; for
    each number kept, (the share kept, the accuracy on them, the confidence threshold)."""
    conf = probs.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    right = (probs.argmax(axis=1) == labels)[order]
    kept = np.arange(1, len(labels) + 1)
    return kept / len(labels), np.cumsum(right) / kept, conf[order]


def confidence_for_accuracy(probs: np.ndarray, labels: np.ndarray, target: float) -> float | None:
    """The lowest top-probability threshold at which the images kept (top probability ≥ it) are
    right at least `target` of the time (on the validation split); None when none reaches it."""
    share, accuracy, conf = risk_coverage(probs, labels)
    ok = np.flatnonzero(accuracy >= target)
    return None if not len(ok) else round(float(conf[ok[-1]]), DECIMALS)
