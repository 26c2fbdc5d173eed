"""Logits to probabilities, with numpy alone: the evaluate stage and `pipeline predict` use
this one function, and predict with an ONNX model imports neither torch nor scikit-learn."""
import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so rows sum to 1 to machine precision (log_loss checks)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise 1 / (1 + e^-z) in float64 (task=multilabel: a probability per label), without
    overflow at any z."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))
