"""Test-split metrics with scikit-learn: headline numbers, per-class table, confusion matrix."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Return (headline metrics, per-class table, confusion matrix counts).

    Macro averages weight every class equally; a class that is never predicted has precision 0
    (scikit-learn's `zero_division=0`), which pulls the macro precision down, as it should."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(pm),
        "recall_macro": float(rm),
        "f1_macro": float(fm),
        "n_test": int(len(y_true)),
    }
    per_class = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return metrics, per_class, cm
