"""Stage `evaluate`: the checkpoint on the test split.

Reads: models/model.pt, models/mlflow_run.json, data/prepared/ (no params: the checkpoint
carries its preprocessing); metrics/train.json and the train/prepare pictures when present
(for the report). Writes, in metrics/: eval.json (the metrics dict, also logged to MLflow as
test_*), per_class.csv, predictions.csv (actual,predicted per test image: the `confusion`
plots), confusion_matrix.json (counts and row-normalised), confusion_matrix.png,
misclassified.png, gradcam.png, report.md; all of them are logged to the MLflow run that
train started. Run: `dvc repro evaluate`."""
import pandas as pd

from pipeline import paths, tracking
from pipeline.checkpoint import load_checkpoint, predict_logits
from pipeline.data import load_split
from pipeline.errors import run_cli
from pipeline.eval_report import evaluation_report
from pipeline.evaluate import evaluation_metrics, most_confident_mistakes, normalize_rows, softmax
from pipeline.gradcam import gradcam_figure
from pipeline.io import atomic_path, read_json, write_json
from pipeline.plots import confusion_matrix, misclassified_grid

OUTPUTS = [paths.EVAL_METRICS, paths.PER_CLASS, paths.PREDICTIONS, paths.CONFUSION_JSON, paths.CONFUSION_PNG,
           paths.MISCLASSIFIED_PNG, paths.GRADCAM_PNG, paths.EVAL_REPORT_MD]


def main() -> dict:
    model, ckpt = load_checkpoint(paths.CHECKPOINT)
    classes, prep = ckpt["classes"], ckpt["preprocessing"]
    x, y = load_split("test", paths.PREPARED_DIR)
    probs = softmax(predict_logits(model, x, prep["mean"], prep["std"]))
    pred = probs.argmax(1)
    metrics, per_class, cm = evaluation_metrics(y, probs, classes)

    write_json(paths.EVAL_METRICS, metrics)
    with atomic_path(paths.PER_CLASS) as tmp:
        per_class.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.PREDICTIONS) as tmp:
        pd.DataFrame({"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}).to_csv(tmp, index=False)
    write_json(paths.CONFUSION_JSON, {"classes": classes, "matrix": cm.tolist(),
                                      "normalized": normalize_rows(cm).round(6).tolist()})
    confusion_matrix(cm, classes, paths.CONFUSION_PNG)
    wrong = most_confident_mistakes(y, probs)
    misclassified_grid(x[wrong], [f"{classes[y[i]]} → {classes[pred[i]]} ({probs[i].max():.2f})" for i in wrong],
                       paths.MISCLASSIFIED_PNG, n_test=len(y))
    note = gradcam_figure(model, x, y, classes, prep["mean"], prep["std"], paths.GRADCAM_PNG)
    if note:
        print(f"evaluate: {note}")

    run = read_json(paths.MLFLOW_RUN)
    train_summary = read_json(paths.TRAIN_METRICS) if paths.TRAIN_METRICS.exists() else None
    pictures = [("Learning curves", paths.LEARNING_CURVES_PNG), ("Confusion matrix", paths.CONFUSION_PNG),
                ("Most confidently misclassified", paths.MISCLASSIFIED_PNG), ("Grad-CAM", paths.GRADCAM_PNG),
                ("Augmented training samples", paths.AUGMENTED_SAMPLES_PNG)]
    report = evaluation_report(ckpt=ckpt, run=run, train_summary=train_summary, metrics=metrics, per_class=per_class,
                               pictures=pictures, report_path=paths.EVAL_REPORT_MD, notes=[note] if note else [])
    with atomic_path(paths.EVAL_REPORT_MD) as tmp:
        tmp.write_text(report)

    with tracking.resume_run(paths.MLFLOW_RUN) as mlflow:
        tracking.log_metrics(mlflow, {f"test_{k}": v for k, v in metrics.items()})
        tracking.log_artifacts(mlflow, OUTPUTS)
    print("evaluate: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(per_class.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics


if __name__ == "__main__":
    run_cli(main)
