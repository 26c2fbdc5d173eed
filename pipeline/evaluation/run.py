"""What the evaluate stage does: the checkpoint on the test split, every metric, table and
picture of it (the report stage then writes the report and logs it all to MLflow).

Metrics (metrics/eval.json): the plain ones of the model's softmax; `temperature` with
`log_loss_calibrated` and `ece_calibrated` (the probabilities export and predict give); with
`evaluate.tta`, the test-time-augmented ones as `<metric>_tta`; where test images have a
near-duplicate in train/val (a data set that came split), `accuracy_clean` on the others."""
import numpy as np
import pandas as pd

from pipeline.calibration import scaled
from pipeline.core import paths
from pipeline.checkpoint import (
    is_multilabel,
    load_checkpoint,
    predict_logits,
    predict_logits_and_features,
    preprocessing,
    temperature,
    val_logits,
)
from pipeline.evaluation import pictures
from pipeline.evaluation.figures import confusion_matrix, misclassified_grid
from pipeline.evaluation.gradcam import gradcam_figure
from pipeline.evaluation.sets import evaluate_sets, sets_figure, with_set_columns
from pipeline.evaluation.metrics import (
    calibration_metrics,
    evaluation_metrics,
    most_confident_mistakes,
    normalize_rows,
    softmax,
    tta_metrics,
)
from pipeline.core.io import atomic_path, write_json
from pipeline.core.preprocess import tta_views
from pipeline.core.processes import side_by_side
from pipeline.plots import note_figure
from pipeline.prepared import leaked_test, load_split

# DVC outputs (dvc.yaml declares exactly these)
OUTPUTS = [paths.EVAL_METRICS, paths.PER_CLASS, paths.PREDICTIONS, paths.CONFUSION_JSON, paths.CONFUSION_PNG,
           paths.MISCLASSIFIED_PNG, paths.PR_CURVES_PNG, paths.PREDICTION_SETS_PNG, paths.GRADCAM_PNG, paths.LEARNING_CURVES_PNG, paths.RELIABILITY_PNG,
           paths.ACTIVATIONS_PNG, paths.FILTERS_PNG, paths.EMBEDDING_PNG, paths.LABEL_ISSUES, paths.LABEL_ISSUES_PNG,
           paths.EVAL_NOTES]


def tta_logits(model, x: np.ndarray, prep, mode: str, centre: np.ndarray | None = None) -> list[np.ndarray]:
    """The model's logits of each test-time-augmentation view (`pipeline.core.preprocess.tta_views`);
    `centre`: the plain pass's logits, which are the first view's (its centre crop): not run again."""
    views = tta_views(x, prep.image_size, mode)
    first = [centre] if centre is not None else []
    return first + [predict_logits(model, view, prep) for view in views[len(first):]]


def tta_probabilities(views: list[np.ndarray], t: float = 1.0) -> np.ndarray:
    """The mean of the views' probabilities (fastai's TTA averages probabilities, not logits)."""
    return np.mean([softmax(scaled(v, t)) for v in views], axis=0)


def score(model, ckpt: dict, x: np.ndarray, y: np.ndarray, tta: str) -> tuple[dict, pd.DataFrame, np.ndarray, dict]:
    """(metrics, per-class table, confusion counts, {"plain", "calibrated": probabilities; "features":
    the penultimate features from the same pass, or None; "val_logits": the checkpoint's, or None})."""
    prep, classes, t = preprocessing(ckpt), ckpt["classes"], temperature(ckpt)
    logits, features = predict_logits_and_features(model, x, prep)  # the features: the embedding's
    probs = softmax(logits)
    metrics, per_class, cm = evaluation_metrics(y, probs, classes)
    metrics |= calibration_metrics(y, logits, t)
    if tta != "none":
        views = tta_logits(model, x, prep, tta, centre=logits)
        metrics |= tta_metrics(y, tta_probabilities(views), classes) | {"tta_views": len(views)}
    return metrics, per_class, cm, {"plain": probs, "calibrated": softmax(scaled(logits, t)), "features": features,
                                    "val_logits": val_logits(ckpt)}


def clean_metrics(y: np.ndarray, pred: np.ndarray, leaked: np.ndarray) -> dict:
    """Where test images have a near-duplicate or group member in train/val: accuracy on the
    others ("clean"), on them, and how many each; nothing when none leaked."""
    if not leaked.any():
        return {}
    right = pred == y
    return {"accuracy_clean": float(right[~leaked].mean()) if (~leaked).any() else float("nan"),
            "accuracy_leaked": float(right[leaked].mean()), "test_images_clean": int((~leaked).sum()),
            "test_images_leaked": int(leaked.sum())}


def run(params) -> dict:
    """Score models/model.pt on the test split; write every output; return the metrics."""
    model, ckpt = load_checkpoint(paths.CHECKPOINT)
    classes, prep = ckpt["classes"], preprocessing(ckpt)
    x, y = load_split("test", paths.PREPARED_DIR)
    if is_multilabel(ckpt):
        from pipeline.evaluation import multilabel_run

        return multilabel_run.run(model, ckpt, x, y, params)
    metrics, per_class, cm, probs = score(model, ckpt, x, y, params.evaluate.tta)
    metrics |= clean_metrics(y, probs["plain"].argmax(1), leaked_test(paths.PREPARED_DIR))
    set_metrics, sets = evaluate_sets(ckpt, probs["calibrated"], y, params.evaluate.conformal_alpha)
    metrics |= set_metrics
    per_class = with_set_columns(per_class, sets, y)
    write_tables(metrics, per_class, cm, y, probs["plain"].argmax(1), classes)
    write_json(paths.EVAL_NOTES, draw(model, x, y, probs, cm, classes, prep, metrics, params, sets))
    print(metrics_table(metrics))
    print(per_class.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics


def draw_sets(sets, probs, y, classes: list[str], metrics: dict, alpha: float) -> None:
    """metrics/prediction_sets.png, or a note saying why there are no sets."""
    if sets is not None:
        sets_figure(sets, probs, y, classes, metrics, paths.PREDICTION_SETS_PNG)
    elif not alpha:
        note_figure("Prediction sets switched off: evaluate.conformal_alpha: 0 (dvc exp run -S "
                    "evaluate.conformal_alpha=0.1 gives sets that hold the true class 90 % of the time)",
                    paths.PREDICTION_SETS_PNG)
    else:
        note_figure(f"No prediction sets: {paths.CHECKPOINT} holds no validation scores to calibrate them "
                    "(made before prediction sets): re-run train", paths.PREDICTION_SETS_PNG)


def metrics_table(metrics: dict, columns: int = 2) -> str:
    """The test metrics as a small aligned table, `columns` name/value pairs a row."""
    from pipeline.evaluation.report import SHORT_NAMES, number

    cells = [(SHORT_NAMES.get(k, k), number(v)) for k, v in metrics.items()]
    name_w, value_w = max(len(n) for n, _ in cells), max(len(v) for _, v in cells)
    rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
    lines = ["   ".join(f"{n:<{name_w}} {v:>{value_w}}" for n, v in row).rstrip() for row in rows]
    return "evaluate: test split\n" + "\n".join("  " + line for line in lines)


def write_tables(metrics: dict, per_class: pd.DataFrame, cm, y, pred, classes: list[str]) -> None:
    write_json(paths.EVAL_METRICS, metrics)
    with atomic_path(paths.PER_CLASS) as tmp:
        per_class.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.PREDICTIONS) as tmp:
        pd.DataFrame({"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}).to_csv(tmp, index=False)
    write_json(paths.CONFUSION_JSON, {"classes": classes, "matrix": cm.tolist(),
                                      "normalized": normalize_rows(cm).round(6).tolist()})


def draw(model, x, y, probs: dict, cm, classes: list[str], prep, metrics: dict, params, sets=None) -> list[str]:
    """Every picture; the notes on what could not be drawn or was switched off (for the report).
    Drawing is single-threaded matplotlib and torch: the filters and the embedding (`there`) are
    drawn by a fork beside the others, which on two cores takes the time of the longer half, not
    the sum (about 4 s instead of 8 s for ResNet-18 at 64 px on a 2-core CPU), each picture's
    bytes those of one process drawing all."""
    def here() -> list[str | None]:
        plain = probs["plain"]
        draw_sets(sets, probs["calibrated"], y, classes, metrics, params.evaluate.conformal_alpha)
        confusion_matrix(cm, classes, paths.CONFUSION_PNG)
        note_figure("Precision-recall curves per label are drawn for task=multilabel; with one class per image, see "
                    "confusion_matrix.png and per_class.csv", paths.PR_CURVES_PNG)
        wrong, pred = most_confident_mistakes(y, plain), plain.argmax(1)
        misclassified_grid(prep.center_crop(x[wrong]),
                           [f"{classes[y[i]]} → {classes[pred[i]]} ({plain[i].max():.2f})" for i in wrong],
                           paths.MISCLASSIFIED_PNG, n_test=len(y))
        notes = [gradcam_figure(model, x, y, plain, classes, prep, paths.GRADCAM_PNG),
                 pictures.training_curves(params.plots.smoothing)]
        pictures.reliability(y, plain, probs["calibrated"], metrics)
        notes += inside(("activations",))
        return notes + [pictures.label_issues(model, prep, classes, metrics["temperature"], params.evaluate.label_issues,
                                              probs["val_logits"])]

    def inside(parts: tuple[str, ...]) -> list[str]:
        return pictures.inside(model, x, y, probs["plain"], classes, prep, params.evaluate, probs["features"], parts)

    (*notes, label_note), there = side_by_side(here, lambda: inside(("filters", "embedding")))
    notes = [n for n in [*notes, *there, label_note] if n]
    for note in notes:
        print(f"evaluate: {note}")
    return notes
