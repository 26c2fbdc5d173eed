"""What the evaluate stage does: the checkpoint on the test split, every metric, table and
picture of it, the one-page report, all logged to the MLflow run that train started.

Metrics (metrics/eval.json): the plain ones of the model's softmax; `temperature` with
`log_loss_calibrated` and `ece_calibrated` (the probabilities export and predict give); with
`evaluate.tta`, the test-time-augmented ones as `<metric>_tta`."""
import os
import time

import numpy as np
import pandas as pd

from pipeline import paths, runview, tracking
from pipeline.calibration import scaled
from pipeline.checkpoint import load_checkpoint, predict_logits, preprocessing, run_fallback, temperature
from pipeline.evaluation import pictures
from pipeline.evaluation.figures import confusion_matrix, misclassified_grid
from pipeline.evaluation.gradcam import gradcam_figure
from pipeline.evaluation.metrics import (
    calibration_metrics,
    evaluation_metrics,
    most_confident_mistakes,
    normalize_rows,
    softmax,
    tta_metrics,
)
from pipeline.evaluation.report import report_blocks, to_html, to_markdown
from pipeline.io import atomic_path, files_sha256, read_json, write_json
from pipeline.prepared import load_split, split_files
from pipeline.preprocess import tta_views

# DVC outputs (dvc.yaml declares exactly these), and what is logged to MLflow: they and the report
OUTPUTS = [paths.EVAL_METRICS, paths.PER_CLASS, paths.PREDICTIONS, paths.CONFUSION_JSON, paths.CONFUSION_PNG,
           paths.MISCLASSIFIED_PNG, paths.GRADCAM_PNG, paths.LEARNING_CURVES_PNG, paths.RELIABILITY_PNG,
           paths.ACTIVATIONS_PNG, paths.FILTERS_PNG, paths.EMBEDDING_PNG, paths.LABEL_ISSUES, paths.LABEL_ISSUES_PNG]
LOGGED = OUTPUTS + [paths.EVAL_REPORT_MD, paths.EVAL_REPORT_HTML]
PICTURES = [("Learning curves", paths.LEARNING_CURVES_PNG), ("Confusion matrix", paths.CONFUSION_PNG),
            ("Most confidently misclassified", paths.MISCLASSIFIED_PNG), ("Grad-CAM", paths.GRADCAM_PNG),
            ("Reliability (calibration)", paths.RELIABILITY_PNG), ("Inner activations", paths.ACTIVATIONS_PNG),
            ("Filters and what deeper channels respond to", paths.FILTERS_PNG),
            ("Embedding of the test split", paths.EMBEDDING_PNG), ("Suspected label issues", paths.LABEL_ISSUES_PNG),
            ("Augmented training samples", paths.AUGMENTED_SAMPLES_PNG)]


def tta_logits(model, x: np.ndarray, prep, mode: str, centre: np.ndarray | None = None) -> list[np.ndarray]:
    """The model's logits of each test-time-augmentation view (`pipeline.preprocess.tta_views`);
    `centre`: the plain pass's logits, which are the first view's (its centre crop): not run again."""
    views = tta_views(x, prep.image_size, mode)
    first = [centre] if centre is not None else []
    return first + [predict_logits(model, view, prep) for view in views[len(first):]]


def tta_probabilities(views: list[np.ndarray], t: float = 1.0) -> np.ndarray:
    """The mean of the views' probabilities (fastai's TTA averages probabilities, not logits)."""
    return np.mean([softmax(scaled(v, t)) for v in views], axis=0)


def score(model, ckpt: dict, x: np.ndarray, y: np.ndarray, tta: str) -> tuple[dict, pd.DataFrame, np.ndarray, dict]:
    """(metrics, per-class table, confusion counts, probabilities: plain and calibrated)."""
    prep, classes, t = preprocessing(ckpt), ckpt["classes"], temperature(ckpt)
    logits = predict_logits(model, x, prep)
    probs = softmax(logits)
    metrics, per_class, cm = evaluation_metrics(y, probs, classes)
    metrics |= calibration_metrics(y, logits, t)
    if tta != "none":
        views = tta_logits(model, x, prep, tta, centre=logits)
        metrics |= tta_metrics(y, tta_probabilities(views), classes) | {"tta_views": len(views)}
    return metrics, per_class, cm, {"plain": probs, "calibrated": softmax(scaled(logits, t))}


def run(params) -> dict:
    """Score models/model.pt on the test split; write and log every output; return the metrics."""
    tracking.enabled()  # an unusable store stops the stage here, before any output is written
    model, ckpt = load_checkpoint(paths.CHECKPOINT)
    classes, prep = ckpt["classes"], preprocessing(ckpt)
    x, y = load_split("test", paths.PREPARED_DIR)
    metrics, per_class, cm, probs = score(model, ckpt, x, y, params.evaluate.tta)
    write_tables(metrics, per_class, cm, y, probs["plain"].argmax(1), classes)
    notes = draw(model, x, y, probs, cm, classes, prep, metrics, params)
    with tracking.resume_run(paths.MLFLOW_RUN, paths.CHECKPOINT, **run_fallback(ckpt)) as mlflow:
        write_report(ckpt, metrics, per_class, notes)
        tracking.log_metrics(mlflow, runview.test_metrics(metrics))
        tracking.log_diagnostics(mlflow, "evaluate", {k: metrics[k] for k in runview.TEST_COUNTS if k in metrics})
        tracking.log_inputs(mlflow, [(runview.dataset_input(
            ckpt.get("params", {}).get("dataset", "data"), files_sha256(split_files("test")),
            str(paths.PREPARED_DIR), "test", len(y), x.shape[-1]), "testing")])
        tracking.log_artifacts(mlflow, LOGGED)
    print("evaluate: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(per_class.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics


def write_tables(metrics: dict, per_class: pd.DataFrame, cm, y, pred, classes: list[str]) -> None:
    write_json(paths.EVAL_METRICS, metrics)
    with atomic_path(paths.PER_CLASS) as tmp:
        per_class.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.PREDICTIONS) as tmp:
        pd.DataFrame({"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}).to_csv(tmp, index=False)
    write_json(paths.CONFUSION_JSON, {"classes": classes, "matrix": cm.tolist(),
                                      "normalized": normalize_rows(cm).round(6).tolist()})


def draw(model, x, y, probs: dict, cm, classes: list[str], prep, metrics: dict, params) -> list[str]:
    """Every picture; the notes on what could not be drawn or was switched off (for the report)."""
    plain = probs["plain"]
    confusion_matrix(cm, classes, paths.CONFUSION_PNG)
    wrong, pred = most_confident_mistakes(y, plain), plain.argmax(1)
    misclassified_grid(prep.center_crop(x[wrong]),
                       [f"{classes[y[i]]} → {classes[pred[i]]} ({plain[i].max():.2f})" for i in wrong],
                       paths.MISCLASSIFIED_PNG, n_test=len(y))
    notes = [gradcam_figure(model, x, y, plain, classes, prep, paths.GRADCAM_PNG),
             pictures.training_curves(params.plots.smoothing)]
    pictures.reliability(y, plain, probs["calibrated"], metrics)
    notes += pictures.inside(model, x, y, plain, classes, prep, params.evaluate)
    notes.append(pictures.label_issues(model, prep, classes, metrics["temperature"], params.evaluate.label_issues))
    for note in filter(None, notes):
        print(f"evaluate: {note}")
    return [n for n in notes if n]


def write_report(ckpt: dict, metrics: dict, per_class: pd.DataFrame, notes: list[str]) -> None:
    """metrics/report.md and its self-contained twin report.html: they name the MLflow run, the
    date and the commit, so they differ from run to run and are not DVC outputs (report.md is
    in git beside its pictures; both are logged to the run)."""
    run = read_json(paths.MLFLOW_RUN) if paths.MLFLOW_RUN.exists() else None
    train_summary = read_json(paths.TRAIN_METRICS) if paths.TRAIN_METRICS.exists() else None
    commit = tracking.git_commit()
    context = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit[:10] if commit else "",
               "DVC experiment": os.environ.get("DVC_EXP_NAME", "")}
    blocks = report_blocks(ckpt=ckpt, run=run, train_summary=train_summary, metrics=metrics, per_class=per_class,
                           pictures=PICTURES, notes=notes, context=context)
    with atomic_path(paths.EVAL_REPORT_MD) as tmp:
        tmp.write_text(to_markdown(blocks, paths.EVAL_REPORT_MD))
    with atomic_path(paths.EVAL_REPORT_HTML) as tmp:
        tmp.write_text(to_html(blocks))
