"""Stage `evaluate`: the checkpoint on the test split.

Reads: models/model.pt, models/mlflow_run.json, data/prepared/ (no params: the checkpoint
carries its preprocessing). Writes: metrics/eval.json, metrics/per_class.csv,
metrics/predictions.csv (actual,predicted per test image: the `confusion` plot),
metrics/confusion_matrix.json, metrics/confusion_matrix.png. Run: `dvc repro evaluate`."""
import pandas as pd

from pipeline import paths, tracking
from pipeline.checkpoint import load_checkpoint, predict_logits
from pipeline.data import load_split
from pipeline.errors import run_cli
from pipeline.evaluate import classification_metrics
from pipeline.io import atomic_path, write_json
from pipeline.plots import confusion_matrix


def main() -> dict:
    model, ckpt = load_checkpoint(paths.CHECKPOINT)
    classes, prep = ckpt["classes"], ckpt["preprocessing"]
    x, y = load_split("test", paths.PREPARED_DIR)
    pred = predict_logits(model, x, prep["mean"], prep["std"]).argmax(1)
    metrics, per_class, cm = classification_metrics(y, pred, classes)

    write_json(paths.EVAL_METRICS, metrics)
    with atomic_path(paths.PER_CLASS) as tmp:
        per_class.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.PREDICTIONS) as tmp:
        pd.DataFrame({"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}).to_csv(tmp, index=False)
    write_json(paths.CONFUSION_JSON, {"classes": classes, "matrix": cm.tolist()})
    confusion_matrix(cm, classes, paths.CONFUSION_PNG)

    with tracking.resume_run(paths.MLFLOW_RUN) as mlflow:
        tracking.log_metrics(mlflow, {f"test_{k}": v for k, v in metrics.items()})
        tracking.log_artifacts(mlflow, [paths.EVAL_METRICS, paths.PER_CLASS, paths.PREDICTIONS,
                                        paths.CONFUSION_JSON, paths.CONFUSION_PNG])
    print("evaluate: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(per_class.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics


if __name__ == "__main__":
    run_cli(main)
