"""What the export stage does: models/model.onnx from the checkpoint (its logits divided by the
checkpoint's temperature, so softmax gives calibrated probabilities), checked against PyTorch
with ONNX Runtime on the whole test split, its latency, and the model logged to MLflow."""
import numpy as np
import torch

from pipeline import paths, runview, tracking
from pipeline.checkpoint import calibrated, load_checkpoint, predict_logits, preprocessing, run_fallback
from pipeline.export.onnx import (
    batch1_latency,
    check_parity,
    export_onnx,
    model_card,
    onnx_logits,
    onnx_metadata,
    parity,
)
from pipeline.io import atomic_path, write_json
from pipeline.export.runtime import session_providers
from pipeline.prepared import load_split


def run(register_as: str | None, alias: str) -> dict:
    """Export models/model.pt to ONNX, check it, time it, log (and register) it; return the metrics."""
    tracking.enabled()  # an unusable store stops the stage here, before any output is written
    raw, ckpt = load_checkpoint(paths.CHECKPOINT)
    model = calibrated(raw, ckpt)  # logits / T: the exported model's softmax is calibrated
    card, prep = model_card(ckpt), preprocessing(ckpt)
    x, _ = load_split("test", paths.PREPARED_DIR)
    x_float = prep.model_input(torch.from_numpy(np.array(x))).numpy()
    with atomic_path(paths.ONNX_MODEL) as tmp:
        export_onnx(model, prep.image_size, tmp, onnx_metadata(card))
        ort_logits = onnx_logits(tmp, x_float)
        metrics = parity(predict_logits(model, x, prep), ort_logits)
        check_parity(metrics)
        timing = batch1_latency(model, tmp, x_float[:1])
        write_json(paths.ONNX_META, card)
    metrics["onnx_bytes"] = paths.ONNX_MODEL.stat().st_size
    write_json(paths.EXPORT_METRICS, metrics)  # a DVC metric: the same for the same model
    write_json(paths.EXPORT_TIMING, timing)    # latencies vary run to run: not a DVC output
    result = metrics | timing
    with tracking.resume_run(paths.MLFLOW_RUN, paths.CHECKPOINT, **run_fallback(ckpt)) as mlflow:
        tracking.log_metrics(mlflow, runview.export_metrics(result))
        tracking.log_diagnostics(mlflow, "export", result)
        tracking.log_artifacts(mlflow, [paths.ONNX_META, paths.EXPORT_METRICS], artifact_path="onnx")
        info = tracking.log_onnx_model(mlflow, paths.ONNX_MODEL, x_float[:1], {"logits": ort_logits[:1]}, card,
                                       register_as, alias, providers=session_providers())
    registered = (f", registered as {register_as} v{info.registered_model_version} @{alias}"
                  if info and register_as else "")
    logged = f"; MLflow model {info.model_uri}{registered}" if info else ""
    print(f"export: {paths.ONNX_MODEL} ({result['onnx_bytes'] / 1e6:.2f} MB); top-1 agreement "
          f"{result['top1_agreement']:.2%}, max |logit diff| {result['max_abs_logit_diff']:.2e} "
          f"on {result['n_checked']} test images; batch-1 CPU latency p50 torch "
          f"{result['torch_latency_ms_p50']:.2f} ms, ONNX Runtime {result['onnx_latency_ms_p50']:.2f} ms{logged}")
    return result

