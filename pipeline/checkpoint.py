"""Self-describing checkpoints and the inference they support.

A checkpoint holds everything needed to rebuild and use the model without params.yaml:
architecture name and kwargs, weights, class names, preprocessing (mean, std, image size,
and prepare's resize policy, which `pipeline predict` applies to images of other sizes),
the params that made it and its training summary. It contains only tensors and plain Python
values, so it loads with `torch.load(weights_only=True)` (no arbitrary pickles).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.augment import normalize
from pipeline.errors import UserError
from pipeline.io import atomic_path
from pipeline.models import build_model

FORMAT_VERSION = 1


def save_checkpoint(path: Path, *, arch: str, arch_kwargs: dict[str, Any], state_dict: dict,
                    classes: list[str], mean: list[float], std: list[float], image_size: int,
                    params: dict[str, Any], summary: dict[str, Any], resize: str = "center_crop") -> None:
    ckpt = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": state_dict,
        "classes": classes,
        "preprocessing": {"mean": mean, "std": std, "image_size": image_size, "channels": 3, "resize": resize},
        "params": params,
        "summary": summary,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model (eval mode) from a checkpoint; return it and the checkpoint dict."""
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


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, mean: list[float], std: list[float],
                   batch_size: int = 256) -> np.ndarray:
    """Logits (N×K float32) of uint8 N×3×H×W images under the evaluation preprocessing."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        xb = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)
        out.append(model(normalize(xb, mean, std)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
