"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one
number T, fitted after training on the validation split by minimising its log loss, so that
softmax(logits / T) says how often the model is right. Accuracy is unchanged (the argmax is
the same); confidence is shrunk (T > 1, the usual case: over-confident networks) or sharpened.

numpy and scipy only: the train stage fits T, evaluate and `pipeline predict` apply it, and
predict with an ONNX model imports no torch (the exported graph divides by T itself).
"""
from __future__ import annotations

import numpy as np

T_BOUNDS = (0.05, 20.0)  # the search range; a T at a bound means the split cannot pin it down


def nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / t), in float64."""
    z = logits.astype(np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """(T, a note): T minimising the validation log loss (a bounded 1-D search over log T, as
    exact as L-BFGS on one variable and never diverging), rounded to 4 significant digits so
    the checkpoint is the same bytes on any machine. With no mistakes on the split, the log loss
    falls forever as T → 0 (sharper is always better): T = 1 then, and the note says why."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return 1.0, "no validation images: not calibrated (T = 1)"
    if (logits.argmax(axis=1) == labels).all():
        return 1.0, "no mistakes on the validation split to calibrate against: T = 1"
    t = _best_temperature(lambda t: nll(logits, labels, t))
    before, after = nll(logits, labels, 1.0), nll(logits, labels, t)
    return t, f"temperature {t:g} fitted on {len(labels):,} validation images (log loss {before:.4f} → {after:.4f})"


def _best_temperature(loss) -> float:
    """The T in T_BOUNDS minimising `loss(T)`, by a bounded 1-D search over log T, rounded to 4
    significant digits."""
    from scipy.optimize import minimize_scalar

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(lambda log_t: loss(float(np.exp(log_t))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-5})
    return float(f"{np.exp(res.x):.4g}")


def scaled(logits: np.ndarray, t: float) -> np.ndarray:
    """logits / T, as float64 (softmax of it: the calibrated probabilities)."""
    return logits.astype(np.float64) / t


# Multi-label (task: multilabel): C independent yes/no answers per image, probabilities
# sigmoid(logits / T) with ONE temperature shared by all labels, fitted on the validation split.

from pipeline.probabilities import sigmoid  # noqa: E402, F401  (one sigmoid, numpy only: predict's too)


def binary_nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean binary cross-entropy of sigmoid(logits / t) against the 0/1 targets `y`, over all
    N×C entries, in float64. Computed from the logits (−log σ(z) = log(1 + e^−z), a log-sum-exp),
    so a confident entry costs its true amount instead of log(0) = −inf or a clipped guess."""
    z = np.asarray(logits, dtype=np.float64) / t
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(y, dtype=np.float64) * z))


def fit_sigmoid_temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """(T, a note): the one T for all labels minimising the validation `binary_nll`, found as
    `fit_temperature` finds it (a bounded 1-D search over log T in T_BOUNDS, rounded to 4
    significant digits). With no mistake at threshold 0.5 (every entry's logit on the side of its
    target; a logit of exactly 0 is no mistake, as no T moves it), the loss falls forever as
    T → 0: T = 1 then, and the note says why."""
    logits, y = np.asarray(logits), np.asarray(y).astype(bool)
    if len(y) == 0:
        return 1.0, "no validation images: not calibrated (T = 1)"
    if not (((logits < 0) & y) | ((logits > 0) & ~y)).any():
        return 1.0, "no mistakes on the validation split to calibrate against: T = 1"
    t = _best_temperature(lambda t: binary_nll(logits, y, t))
    before, after = binary_nll(logits, y, 1.0), binary_nll(logits, y, t)
    c = y.shape[1]
    return t, (f"temperature {t:g} fitted on {len(y):,} validation images, one for all {c} label{'s' * (c != 1)} "
               f"(log loss {before:.4f} → {after:.4f})")
