"""Member weights: given on the command line, or fitted on the validation split.

`fit_weights` minimises the validation log loss of the weighted average of the members'
(calibrated) probabilities, w = softmax(θ) so that the weights stay non-negative and sum to 1;
L-BFGS from equal weights with the exact gradient, so the same inputs give the same weights.
The loss is convex in w, so the optimum is the global one; identical members keep equal weights
(the gradient is zero there), and a confidently wrong member is driven to ~0 weight.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from pipeline.core.errors import UserError
from pipeline.probabilities import softmax

EPS = 1e-15  # floor of a probability inside the log (a member may give the true class exactly 0)


def parse_weights(text: str, n: int) -> np.ndarray | None:
    """None for 'auto'; else the `n` comma-separated non-negative weights, normalised to sum 1."""
    if text.strip().lower() == "auto":
        return None
    try:
        values = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise UserError(f"--weights {text!r}: give auto or {n} comma-separated numbers, e.g. "
                        f"--weights {','.join(['1'] * n)}") from None
    if len(values) != n:
        raise UserError(f"--weights {text!r} has {len(values)} numbers for {n} members: give one per member, in order")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise UserError(f"--weights {text!r}: weights must be non-negative numbers, not all 0")
    return values / values.sum()


def true_class_probabilities(probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """N×M: each member's probability of each image's true class; for k-hot labels (N×C) and
    per-label probabilities, (N·C)×M: each member's probability of each entry's truth (p where
    the label is on, 1 − p where it is off), so the same loss is the mean binary log loss."""
    if np.ndim(y) == 2:
        return np.stack([np.where(y.astype(bool), p, 1.0 - p).reshape(-1) for p in probs], axis=1)
    return np.stack([p[np.arange(len(y)), y] for p in probs], axis=1)


def fit_weights(probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """The weights (sum 1) of the members' N×K probabilities `probs` with the least log loss on labels `y`."""
    a = true_class_probabilities(probs, y)

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(theta[None])[0]
        q = np.maximum(a @ w, EPS)
        dw = -(a / q[:, None]).mean(axis=0)
        return float(-np.log(q).mean()), w * (dw - w @ dw)

    result = minimize(loss_and_gradient, np.zeros(a.shape[1]), jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
    return softmax(result.x[None])[0]
