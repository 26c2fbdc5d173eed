"""Stage `export`: models/model.onnx, checked against PyTorch with ONNX Runtime on the test split.

Reads: models/model.pt, models/mlflow_run.json, data/prepared/. Writes: models/model.onnx,
metrics/export.json (top-1 agreement, max |logit diff|). Fails, writing neither, when the
agreement is below 100% or the difference above 1e-4. Run: `dvc repro export`."""
import numpy as np

from pipeline import paths, tracking
from pipeline.augment import normalize
from pipeline.checkpoint import load_checkpoint, predict_logits
from pipeline.data import load_split
from pipeline.errors import run_cli
from pipeline.export import check_parity, export_onnx, onnx_logits, parity
from pipeline.io import atomic_path, write_json

import torch


def main() -> dict:
    model, ckpt = load_checkpoint(paths.CHECKPOINT)
    prep = ckpt["preprocessing"]
    x, _ = load_split("test", paths.PREPARED_DIR)
    x_float = normalize(torch.from_numpy(np.array(x)), prep["mean"], prep["std"]).numpy()
    with atomic_path(paths.ONNX_MODEL) as tmp:
        export_onnx(model, prep["image_size"], tmp)
        result = parity(predict_logits(model, x, prep["mean"], prep["std"]), onnx_logits(tmp, x_float))
        check_parity(result)
    result["onnx_bytes"] = paths.ONNX_MODEL.stat().st_size
    write_json(paths.EXPORT_METRICS, result)
    with tracking.resume_run(paths.MLFLOW_RUN) as mlflow:
        tracking.log_metrics(mlflow, {f"export_{k}": v for k, v in result.items()})
        tracking.log_artifacts(mlflow, [paths.ONNX_MODEL, paths.EXPORT_METRICS], artifact_path="onnx")
    print(f"export: {paths.ONNX_MODEL} ({result['onnx_bytes'] / 1e6:.2f} MB); top-1 agreement "
          f"{result['top1_agreement']:.2%}, max |logit diff| {result['max_abs_logit_diff']:.2e} "
          f"on {result['n_checked']} test images")
    return result


if __name__ == "__main__":
    run_cli(main)
