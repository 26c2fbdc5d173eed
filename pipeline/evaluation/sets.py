"""The evaluate stage's prediction sets and abstention (one class per image): the checkpoint's
validation scores give q̂ at `evaluate.conformal_alpha` (`pipeline.conformal`); on the test split,
the coverage and set sizes (eval.json, per class in per_class.csv) and one picture: how large the
sets are, how often each class's set holds it, and what abstaining buys (the risk-coverage curve
of the top probability, with the point where the model answers only when its set is one class)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import conformal
from pipeline.checkpoint import conformal_threshold


def evaluate_sets(ckpt: dict, probs: np.ndarray, y: np.ndarray, alpha: float) -> tuple[dict, np.ndarray | None]:
    """(the metrics, the N×K sets) of the calibrated probabilities at α; ({}, None) when off or
    when the checkpoint has no validation scores."""
    qhat = conformal_threshold(ckpt, alpha)
    if qhat is None:
        return {}, None
    sets = conformal.prediction_sets(probs, qhat)
    metrics = conformal.coverage_metrics(sets, y, alpha, qhat)
    metrics.pop("set_size_counts")  # eval.json holds numbers; the picture shows the sizes
    single = sets.sum(axis=1) == 1
    metrics["singleton_accuracy"] = float((probs.argmax(axis=1) == y)[single].mean()) if single.any() else float("nan")
    return metrics, sets


def with_set_columns(per_class: pd.DataFrame, sets: np.ndarray | None, y: np.ndarray) -> pd.DataFrame:
    """per_class.csv with each class's coverage and mean set size, when there are sets."""
    if sets is None:
        return per_class
    coverage, size = conformal.per_class_coverage(sets, y, len(per_class))
    return per_class.assign(coverage=coverage, set_size=size)


def sets_figure(sets: np.ndarray, probs: np.ndarray, y: np.ndarray, classes: list[str], metrics: dict,
                path: Path) -> None:
    """Set sizes, coverage per class against 1 − α, and the risk-coverage curve."""
    from pipeline.plots import plt, save

    alpha = metrics["conformal_alpha"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    sizes, counts = np.unique(sets.sum(axis=1), return_counts=True)
    a.bar(sizes, counts / len(y), color="tab:blue")
    a.set(xlabel="classes in the set", ylabel="share of test images", xticks=sizes,
          title=f"Set sizes (mean {metrics['set_size_mean']:.2f}; one class: {metrics['singleton_share']:.0%})")
    coverage, _ = conformal.per_class_coverage(sets, y, len(classes))
    shown = np.argsort(coverage)[:30] if len(classes) > 30 else np.arange(len(classes))
    b.barh([classes[i] for i in shown], coverage[shown], color="tab:green")
    b.axvline(1 - alpha, color="tab:red", ls="--", label=f"1 − α = {1 - alpha:g}")
    b.set(xlim=(max(0.0, min(0.5, np.nanmin(coverage) - 0.05)), 1.0), xlabel="coverage (true class in the set)",
          title=f"Coverage per class (all: {metrics['coverage']:.3f})" + (" — 30 lowest" if len(classes) > 30 else ""))
    b.tick_params(axis="y", labelsize=7)
    b.legend(loc="lower left", fontsize=8)
    share, accuracy, _ = conformal.risk_coverage(probs, y)
    c.plot(share, accuracy, color="tab:blue", label="keep the most confident (top probability)")
    if metrics["singleton_share"] > 0:
        c.plot([metrics["singleton_share"]], [metrics["singleton_accuracy"]], "o", color="tab:red",
               label=f"answer only one-class sets ({metrics['singleton_share']:.0%} kept)")
    c.set(xlabel="share of test images answered", ylabel="accuracy on them", xlim=(0, 1.01),
          title="Abstention: accuracy against how many are answered")
    c.grid(alpha=0.3)
    c.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Prediction sets at α = {alpha:g} (split conformal, APS, calibrated on the validation split; "
                 f"q̂ = {metrics['conformal_threshold']:.4f}), test split", fontsize=10)
    save(fig, path)
