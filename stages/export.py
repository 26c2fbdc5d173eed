"""Stage `export`: models/model.onnx, checked against PyTorch with ONNX Runtime on the test split.

Reads: models/model.pt, models/mlflow_run.json, data/prepared/; params mlflow.register_model,
mlflow.model_alias. Writes: models/model.onnx (classes and preprocessing in its metadata),
models/model.json (the same, beside it), metrics/export.json (top-1 agreement, max |logit
diff|, batch-1 CPU latency p50/p95 of PyTorch eager and ONNX Runtime, file size). Fails,
writing nothing, when the agreement is below 100% or the difference above 1e-4. Logs the ONNX
model to the MLflow run (and registers it when mlflow.register_model is set).
Run: `dvc repro export`."""
import numpy as np
import torch

from pipeline import paths, tracking
from pipeline.augment import normalize
from pipeline.checkpoint import load_checkpoint, predict_logits
from pipeline.data import load_split
from pipeline.errors import run_cli
from pipeline.export import batch1_latency, check_parity, export_onnx, model_card, onnx_logits, onnx_metadata, parity
from pipeline.io import atomic_path, write_json
from pipeline.params import load_params


def main() -> dict:
    params = load_params()
    model, ckpt = load_checkpoint(paths.CHECKPOINT)
    card = model_card(ckpt)
    x, _ = load_split("test", paths.PREPARED_DIR)
    x_float = normalize(torch.from_numpy(np.array(x)), card["mean"], card["std"]).numpy()
    with atomic_path(paths.ONNX_MODEL) as tmp:
        export_onnx(model, card["image_size"], tmp, onnx_metadata(card))
        ort_logits = onnx_logits(tmp, x_float)
        result = parity(predict_logits(model, x, card["mean"], card["std"]), ort_logits)
        check_parity(result)
        result |= batch1_latency(model, tmp, x_float[:1])
        write_json(paths.ONNX_META, card)
    result["onnx_bytes"] = paths.ONNX_MODEL.stat().st_size
    write_json(paths.EXPORT_METRICS, result)
    with tracking.resume_run(paths.MLFLOW_RUN) as mlflow:
        tracking.log_metrics(mlflow, {f"export_{k}": v for k, v in result.items()})
        tracking.log_artifacts(mlflow, [paths.ONNX_META, paths.EXPORT_METRICS], artifact_path="onnx")
        info = tracking.log_onnx_model(mlflow, paths.ONNX_MODEL, x_float[:1], {"logits": ort_logits[:1]}, card,
                                       params.mlflow.register_model, params.mlflow.model_alias)
    registered = (f", registered as {params.mlflow.register_model} v{info.registered_model_version} "
                  f"@{params.mlflow.model_alias}" if params.mlflow.register_model else "")
    print(f"export: {paths.ONNX_MODEL} ({result['onnx_bytes'] / 1e6:.2f} MB); top-1 agreement "
          f"{result['top1_agreement']:.2%}, max |logit diff| {result['max_abs_logit_diff']:.2e} "
          f"on {result['n_checked']} test images; batch-1 CPU latency p50 torch "
          f"{result['torch_latency_ms_p50']:.2f} ms, ONNX Runtime {result['onnx_latency_ms_p50']:.2f} ms; "
          f"MLflow model {info.model_uri}{registered}")
    return result


if __name__ == "__main__":
    run_cli(main)
