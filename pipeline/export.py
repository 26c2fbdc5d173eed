"""ONNX export, checked against PyTorch with ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError

MAX_ABS_DIFF = 1e-4


def export_onnx(model: nn.Module, image_size: int, path: Path) -> None:
    """Write `path` with a dynamic batch axis (input `images`, output `logits`)."""
    example = torch.zeros(2, 3, image_size, image_size)
    onnx_program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    onnx_program.save(str(path))


def onnx_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def parity(torch_logits: np.ndarray, ort_logits: np.ndarray) -> dict:
    return {
        "top1_agreement": float((torch_logits.argmax(1) == ort_logits.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(torch_logits - ort_logits).max()),
        "n_checked": int(len(torch_logits)),
    }


def check_parity(result: dict) -> None:
    if result["top1_agreement"] < 1.0 or result["max_abs_logit_diff"] > MAX_ABS_DIFF:
        raise UserError(
            f"ONNX export disagrees with PyTorch: top-1 agreement {result['top1_agreement']:.4%}, "
            f"max |logit diff| {result['max_abs_logit_diff']:.2e} (limit {MAX_ABS_DIFF:g}); "
            "the model uses an op that exports differently: report it with the model name"
        )
