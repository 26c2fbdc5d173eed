"""Stage `export`: models/model.onnx, checked against PyTorch with ONNX Runtime on the test split.

Reads: models/model.pt, models/mlflow_run.json, data/prepared/; params mlflow.register_model,
mlflow.model_alias. Writes: models/model.onnx (classes and preprocessing in its metadata),
models/model.json (the same, beside it), metrics/export.json (top-1 agreement, max |logit
diff|, batch-1 CPU latency p50/p95 of PyTorch eager and ONNX Runtime, file size). Fails,
writing nothing, when the agreement is below 100% or the difference above 1e-4. Logs the ONNX
model to the MLflow run (and registers it when mlflow.register_model is set).
Run: `dvc repro export`."""
from pipeline.errors import run_cli
from pipeline.export.run import run
from pipeline.params import load_params

PARAMS = ("mlflow.register_model", "mlflow.model_alias")


def main() -> dict:
    params = load_params(keys=PARAMS)
    return run(params.mlflow.register_model, params.mlflow.model_alias)


if __name__ == "__main__":
    run_cli(main)
