"""Self-describing checkpoints and the inference they support.

A checkpoint holds everything needed to rebuild and use the model without params.yaml:
architecture name and kwargs, weights, class names, the preprocessing (`Preprocessing.to_dict`:
sizes, resize policy, mean, std and where they came from), the params that made it and its
training summary (only what is the same for the same inputs: the file is byte-identical when
re-made). It contains only tensors and plain Python
values, so it loads with `torch.load(weights_only=True)` (no arbitrary pickles).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.core.io import save_torch
from pipeline.core.preprocess import Preprocessing
from pipeline.models import build_model

FORMAT_VERSION = 1
VAL_LOGITS_MAX = 1 << 20  # values (4 MB): e.g. 10,000 validation images of 100 classes


def save_checkpoint(path: Path, *, arch: str, arch_kwargs: dict[str, Any], state_dict: dict,
                    classes: list[str], prep: Preprocessing, params: dict[str, Any], summary: dict[str, Any],
                    data_hash: str = "", temperature: float | None = None,
                    thresholds: list[float] | None = None, conformal_scores: list[float] | None = None,
                    fingerprint: str = "", val_logits: np.ndarray | None = None) -> None:
    """`data_hash`: the prepared data it was trained on (an ensemble refuses members trained on
    another split); `fingerprint`: what made the training run (its params, data and the code the
    train stage executes, `pipeline.training.run.fingerprint`), so that an edit of that code gives
    a new checkpoint even where the weights come out the same: DVC then re-runs what follows
    train, and the report stage completes the MLflow run train opened; `temperature`: fitted on the validation split (None: not calibrated);
    `thresholds`: task=multilabel, each label's threshold on its calibrated probability (the
    checkpoint then says `task: multilabel`; a one-class-per-image checkpoint has neither key);
    `conformal_scores`: the validation images' conformal scores (`pipeline.conformal`), from which
    any α's prediction-set threshold follows; `val_logits`: the kept weights' logits of the
    validation split, kept when at most VAL_LOGITS_MAX values (evaluate's label issues then
    need no second pass over the split)."""
    assert prep.complete, "a checkpoint needs the mean/std its model was trained with"
    ckpt = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": state_dict,
        "classes": classes,
        "preprocessing": prep.to_dict(),
        "params": params,
        "summary": summary,
        "data_hash": data_hash,
        "temperature": temperature,
    }
    if fingerprint:
        ckpt["fingerprint"] = fingerprint
    if thresholds is not None:
        ckpt |= {"task": "multilabel", "thresholds": [float(v) for v in thresholds]}
    if conformal_scores is not None:
        ckpt["conformal_scores"] = [float(v) for v in conformal_scores]
    if val_logits is not None and np.size(val_logits) <= VAL_LOGITS_MAX:
        ckpt["val_logits"] = torch.as_tensor(np.asarray(val_logits, dtype=np.float32))
    save_torch(ckpt, path)  # the same checkpoint, the same bytes


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model (eval mode) from a checkpoint; return it and the checkpoint dict
    (`preprocessing(ckpt)` gives its Preprocessing)."""
    if not path.exists():
        raise UserError(f"{path} is missing; run the train stage first (dvc repro train)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise UserError(f"{path} is not a readable checkpoint of this project ({type(exc).__name__}); re-run train") from None
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format_version')}, expected {FORMAT_VERSION}; re-run train")
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def preprocessing(ckpt: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(ckpt["preprocessing"])


def conformal_threshold(ckpt: dict[str, Any], alpha: float) -> float | None:
    """q̂ of the prediction sets at level α from the checkpoint's validation scores; None when
    α is 0 or the checkpoint has no scores (multi-label, or made before prediction sets)."""
    from pipeline.conformal import threshold

    scores = ckpt.get("conformal_scores")
    return None if not alpha or not scores else threshold(np.asarray(scores), alpha)


def val_logits(ckpt: dict[str, Any]) -> np.ndarray | None:
    """The validation split's logits training computed with the kept weights; None when the
    checkpoint does not keep them (more than VAL_LOGITS_MAX values, or made before they were)."""
    kept = ckpt.get("val_logits")
    return None if kept is None else kept.numpy()


def is_multilabel(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("task") == "multilabel"


def temperature(ckpt: dict[str, Any]) -> float:
    """The temperature T fitted on the validation split after training (calibrated probabilities
    are softmax(logits / T)); 1.0 for a checkpoint made without calibration."""
    return float(ckpt.get("temperature") or 1.0)


class Calibrated(nn.Module):
    """`model` with its logits divided by the temperature T: softmax of its output is the
    calibrated probability. What export writes to ONNX (the graph divides by T itself) and what
    `pipeline predict` runs from a checkpoint."""

    def __init__(self, model: nn.Module, t: float):
        super().__init__()
        self.model, self.t = model, float(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.t


def calibrated(model: nn.Module, ckpt: dict[str, Any]) -> nn.Module:
    """The checkpoint's model giving calibrated logits; itself when T = 1 (not calibrated)."""
    t = temperature(ckpt)
    return model if t == 1.0 else Calibrated(model, t).eval()


def predict_logits(model: nn.Module, images: np.ndarray, prep: Preprocessing, batch_size: int = 64) -> np.ndarray:
    """Logits (N×K float32) of stored uint8 N×3×S×S images under the evaluation preprocessing
    (centre crop to the model's input size, normalised). In channels_last, batches of 64: on this
    2-core CPU 2.8x the throughput of contiguous batches of 256 (tf_efficientnet_lite0, 128 px)."""
    return predict_logits_and_features(model, images, prep, batch_size, features=False)[0]


def predict_logits_and_features(model: nn.Module, images: np.ndarray, prep: Preprocessing, batch_size: int = 64,
                                features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, penultimate features: N×D float32, what the head sees) from one forward pass, as
    `predict_logits`: the features are the head's input, caught by a hook (evaluate's embedding
    needed a second pass over the test split otherwise). None where the model's forward does not
    call `get_classifier()` (then `pipeline.models.pre_logits` computes them)."""
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)  # outside no_grad: the weights stay usable by autograd
    device = next(model.parameters()).device
    out, seen = [], []
    head = model.get_classifier() if features and hasattr(model, "get_classifier") else None
    hook = (head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(1).float().cpu().numpy()))
            if isinstance(head, nn.Module) else None)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                xb = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)
                out.append(model(prep.model_input(xb).contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    logits = np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
    caught = len(seen) == len(out) and len(out) > 0
    return logits, np.concatenate(seen) if caught else None
