"""ONNX export, checked against PyTorch with ONNX Runtime; the model describes itself.

The ONNX file carries its model card in `metadata_props`: `arch`, `classes`, every field of
the checkpoint's `Preprocessing` (`image_size`, `stored_size`, `resize`, `interpolation`,
`mean`, `std`, `source`, `reason`) and a one-line `preprocessing` recipe; text as is, the rest
as JSON. The same card is written as JSON beside it, so `pipeline predict` (or any ONNX Runtime
user) needs nothing else. Reading it back, and running the file, is `pipeline.export.runtime`
(no torch there).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import conformal_threshold, is_multilabel, preprocessing, temperature
from pipeline.core.errors import UserError
from pipeline.export.runtime import (  # noqa: F401  (the card's functions are this module's interface too)
    CPU,
    META_KEYS,
    onnx_metadata,
    onnx_session,
    read_onnx_metadata,
)

MAX_ABS_DIFF = 1e-4
TORCHSCRIPT_OPSET = 20  # the newest the TorchScript exporter writes (the dynamo exporter's default too)


def model_card(ckpt: dict[str, Any], conformal_alpha: float = 0.0) -> dict[str, Any]:
    """What a user of the exported model needs, from a checkpoint: classes and preprocessing
    (`Preprocessing.from_dict(card)` reads it back); with `conformal_alpha`, the prediction sets'
    level and threshold q̂ (`pipeline.conformal`)."""
    prep, t = preprocessing(ckpt), temperature(ckpt)
    qhat = conformal_threshold(ckpt, conformal_alpha)
    sets = {} if qhat is None else {"conformal_alpha": conformal_alpha, "conformal_threshold": round(min(qhat, 1.0), 6)}
    if is_multilabel(ckpt):
        scaled = f" (divided by the temperature {t:g})" if t != 1.0 else ""
        return {"arch": ckpt["arch"], "classes": list(ckpt["classes"]), **prep.to_dict(), "temperature": t,
                "task": "multilabel", "thresholds": list(ckpt["thresholds"]),
                "preprocessing": f"{prep.describe()}; float32 NCHW input 'images' → outputs 'logits'{scaled} and "
                                 "'probabilities' (a sigmoid per label, calibrated); a label applies where its "
                                 "probability is at least its threshold"}
    scaled = f" (divided by the temperature {t:g}: softmax gives calibrated probabilities)" if t != 1.0 else ""
    how_sets = (f"; the prediction set at α = {conformal_alpha:g}: the classes, most probable first, while the "
                f"probability of those before is at most conformal_threshold") if sets else ""
    return {"arch": ckpt["arch"], "classes": list(ckpt["classes"]), **prep.to_dict(), "temperature": t, **sets,
            "preprocessing": f"{prep.describe()}; float32 NCHW input 'images' → output 'logits'{scaled}{how_sets}"}


class WithProbabilities(nn.Module):
    """task=multilabel's exported graph: the (calibrated) logits and their sigmoid, so that any
    ONNX Runtime user gets each label's probability without knowing the model's head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.sigmoid(logits)


def export_onnx(model: nn.Module, image_size: int, path: Path, metadata: dict[str, str] | None = None,
                outputs: tuple[str, ...] = ("logits",)) -> str:
    """Write `path` with a dynamic batch axis (input `images`, `outputs`: what the model returns,
    `logits` or for a `WithProbabilities` model also `probabilities`) and `metadata` in the
    model's metadata_props; the same model gives the same bytes on any machine. Returns
    the exporter that wrote it: `torchscript`, else `dynamo` for a model it cannot translate.

    TorchScript's exporter first: it is deprecated in favour of the dynamo exporter, but 15-40×
    faster for the same graph (tf_efficientnet_lite0 at 224 px: 0.7 s vs 10.3 s; resnet18 at 64 px:
    0.2 s vs 3.0 s; our CNN at 16 px: 0.1 s vs 4.5 s with torch 2.15), and what it writes is
    checked against PyTorch the same way. The dynamo exporter takes over where it fails (AlexNet
    below 224 px: an adaptive pooling it cannot express) and once torch drops it."""
    model, example = model.eval(), torch.zeros(2, 3, image_size, image_size)
    try:
        _torchscript_export(model, example, path, outputs)
        exporter = "torchscript"
    except Exception:  # noqa: BLE001 (any op it cannot translate: the dynamo exporter is the fallback)
        _dynamo_export(model, example, path, outputs)
        exporter = "dynamo"
    _with_metadata(path, metadata or {})
    return exporter


def _torchscript_export(model: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...]) -> None:
    import warnings

    with warnings.catch_warnings(), _stdout_discarded():  # its deprecation warning; its graph dump on failure
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"],
                          output_names=list(outputs), dynamic_axes={"images": {0: "batch"}} | {o: {0: "batch"} for o in outputs},
                          opset_version=TORCHSCRIPT_OPSET)


def _dynamo_export(model: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...]) -> None:
    onnx_program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["images"], output_names=list(outputs),
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    _reproducible(onnx_program.model)
    onnx_program.save(str(path))


@contextlib.contextmanager
def _stdout_discarded():
    """File descriptor 1 to /dev/null for the duration (the TorchScript exporter prints its
    whole graph from C++ when an op fails, which Python's redirect_stdout cannot catch)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _with_metadata(path: Path, metadata: dict[str, str], replace: bool = False) -> None:
    """Add `metadata` to the model's metadata_props (`replace`: instead of what is there, e.g. what
    ONNX Runtime's quantizer copied and added)."""
    import onnx

    model = onnx.load(str(path))
    if replace:
        del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_version = torch.__version__.split("+")[0]
    onnx.save(model, str(path))


def _reproducible(model) -> None:
    """Drop what ties the file to the machine that made it: the dynamo exporter writes, on every
    node, the Python stack trace that made it (absolute paths of this checkout and its venv)
    and module/FX names. Two checkouts in different folders wrote different model.onnx files
    from one model."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
    for function in model.functions.values():
        for node in function.all_nodes():
            node.metadata_props.clear()


def onnx_logits(path: Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """ONNX Runtime's logits of normalised images on the CPU (the parity check compares them
    with PyTorch's on the CPU)."""
    return onnx_outputs(path, x, batch_size)[0]


def onnx_outputs(path: Path, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of the model (logits first) for normalised images, on the CPU."""
    sess = onnx_session(path, [CPU])
    name = sess.get_inputs()[0].name
    runs = [sess.run(None, {name: x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


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


def latency_ms(fn: Callable[[], object], warmup: int = 5, runs: int = 30, budget_s: float = 0.3) -> dict:
    """p50/p95 wall time of `fn()` in ms: `warmup` untimed calls, then up to `runs` timed ones,
    stopping early once `budget_s` is spent (at least 10 timed calls), so a big model stays quick.
    (50 calls and 1 s gave the same p50s within 2 % for resnet18 at 64 px, PyTorch eager ~10 ms a
    call and ONNX Runtime ~2.7 ms, and took 0.23 s more of the export stage.)"""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and (len(times) < 10 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)), "runs": len(times)}


@torch.inference_mode()
def batch1_latency(model: nn.Module, path: Path, x: np.ndarray) -> dict[str, float]:
    """Batch-1 CPU latency of PyTorch eager and of ONNX Runtime on one normalised image `x` (1×3×S×S)."""
    sess = onnx_session(path, [CPU])
    name = sess.get_inputs()[0].name
    xt = torch.from_numpy(x)
    out: dict[str, float] = {}
    for engine, fn in (("torch", lambda: model(xt)), ("onnx", lambda: sess.run(None, {name: x}))):
        t = latency_ms(fn)
        out |= {f"{engine}_latency_ms_p50": t["p50"], f"{engine}_latency_ms_p95": t["p95"],
                f"{engine}_latency_runs": t["runs"]}
    return out
