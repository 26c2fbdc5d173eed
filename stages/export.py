"""Stage `export`: models/model.onnx, checked against PyTorch with ONNX Runtime on the test split.

Reads: models/model.pt, data/prepared/; params: evaluate.conformal_alpha (the prediction sets' level, carried
in the card), export (the INT8 model: models/int8/). Writes: models/model.onnx (classes and
preprocessing in its metadata), models/model.json (the same, beside it), metrics/export.json (top-1 agreement, max |logit
diff|, batch-1 CPU latency p50/p95 of PyTorch eager and ONNX Runtime, file size). Fails,
writing nothing, when the agreement is below 100% or the difference above 1e-4. (The report
stage logs the ONNX model to MLflow and registers it when mlflow.register_model is set.)
Run: `dvc repro export`."""
from pipeline.core.errors import run_cli
from pipeline.core.params import load_params
from pipeline.export.run import run


def main() -> dict:
    params = load_params(stage="export")
    return run(params.evaluate.conformal_alpha, params.export)


if __name__ == "__main__":
    run_cli(main)
