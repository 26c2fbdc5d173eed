"""The evaluate stage for task=multilabel: the checkpoint's label probabilities on the test
split, at the thresholds chosen on validation (`pipeline.evaluation.multilabel` computes the
numbers). The stage's outputs are the same files as for one class per image (dvc.yaml declares
them once), each holding its multi-label counterpart:

- eval.json: mAP (macro, micro), F1/precision/recall (micro, macro) at the thresholds, subset
  accuracy, Hamming loss, log loss and the mean per-label ECE before and after the temperature
  (one for all labels); per_class.csv: the per-label table (AP, P, R, F1, threshold, ECE);
- predictions.csv: actual and predicted label sets; confusion_matrix.{json,png}: which label
  the model said instead of a missed one (`error_cooccurrence`); pr_curves.png;
- misclassified.png: the most confident false positives and false negatives; gradcam.png: the
  heat map of each predicted label; reliability.png: every (image, label) decision pooled;
- activations / embedding: each image under its first label; label_issues: cleanlab's
  multi-label check of the validation split.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.calibration import scaled, sigmoid
from pipeline.checkpoint import predict_logits, preprocessing, temperature
from pipeline.core import paths
from pipeline.core.io import atomic_path, write_json
from pipeline.evaluation import multilabel as ml
from pipeline.evaluation import pictures
from pipeline.evaluation.figures import gradcam_grid, misclassified_grid, reliability_diagram
from pipeline.evaluation.metrics import ECE_BINS, expected_calibration_error
from pipeline.prepared import label_text, leaked_test, load_split

GRADCAM_IMAGES = 8     # test images whose predicted labels Grad-CAM explains
GRADCAM_LABELS = 3     # at most this many labels each


def run(model, ckpt: dict, x: np.ndarray, y: np.ndarray, params) -> dict:
    """Score, write every output, return the metrics."""
    classes, prep, t = ckpt["classes"], preprocessing(ckpt), temperature(ckpt)
    thresholds = np.asarray(ckpt["thresholds"], dtype=np.float64)
    logits = predict_logits(model, x, prep)
    plain, calibrated = sigmoid(logits.astype(np.float64)), sigmoid(scaled(logits, t))
    metrics, per_label = ml.multilabel_metrics(y, calibrated, thresholds, classes)
    metrics |= ml.calibration_metrics(y, logits, t) | {"ece": float(ml.ece_per_label(y, plain).mean()),
                                                        "log_loss": ml.probability_log_loss(y, plain)}
    if params.evaluate.tta != "none":
        metrics |= tta_metrics(model, x, y, logits, thresholds, classes, prep, t, params.evaluate.tta)
    metrics |= clean_metrics(y, calibrated, leaked_test(paths.PREPARED_DIR))
    pred = ml.predict(calibrated, thresholds)
    write_tables(metrics, per_label, y, pred, classes)
    write_json(paths.EVAL_NOTES, draw(model, x, y, plain, calibrated, thresholds, classes, prep, metrics, params))
    from pipeline.evaluation.run import metrics_table

    print(metrics_table(metrics))
    print(per_label.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return metrics


TTA_KEYS = ("map_macro", "map_micro", "f1_micro", "f1_macro", "log_loss")  # reported again as <key>_tta


def tta_metrics(model, x, y, logits, thresholds, classes, prep, t: float, mode: str) -> dict:
    """The headline figures of each label's calibrated probability averaged over the
    test-time-augmentation views (as for one class per image: probabilities, not logits)."""
    from pipeline.evaluation.run import tta_logits

    views = tta_logits(model, x, prep, mode, centre=logits)
    probs = np.mean([sigmoid(scaled(v, t)) for v in views], axis=0)
    merged, _ = ml.multilabel_metrics(y, probs, thresholds, classes)
    return {f"{k}_tta": merged[k] for k in TTA_KEYS} | {"tta_views": len(views)}


def clean_metrics(y: np.ndarray, probs: np.ndarray, leaked: np.ndarray) -> dict:
    """Where test images have a near-duplicate or group member in train/val: mAP on the others
    and on them, and how many each; nothing when none leaked."""
    if not leaked.any():
        return {}

    def score(keep: np.ndarray) -> float:
        ap = ml.average_precisions(y[keep], probs[keep]) if keep.any() else np.array([np.nan])
        return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
    return {"map_macro_clean": score(~leaked), "map_macro_leaked": score(leaked),
            "test_images_clean": int((~leaked).sum()), "test_images_leaked": int(leaked.sum())}


def write_tables(metrics: dict, per_label: pd.DataFrame, y: np.ndarray, pred: np.ndarray, classes: list[str]) -> None:
    write_json(paths.EVAL_METRICS, metrics)
    with atomic_path(paths.PER_CLASS) as tmp:
        per_label.to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(paths.PREDICTIONS) as tmp:
        pd.DataFrame({"actual": label_text(y, classes, ";", ""), "predicted": label_text(pred, classes, ";", "")}
                     ).to_csv(tmp, index=False)
    cm = ml.error_cooccurrence(y, pred)
    write_json(paths.CONFUSION_JSON, {"classes": classes, "matrix": cm.tolist(), "kind": "error co-occurrence: "
                                      "[missed label][label said instead]; diagonal: missed, nothing said instead"})


def draw(model, x, y, plain, calibrated, thresholds, classes: list[str], prep, metrics: dict, params) -> list[str]:
    """Every picture; the notes on what could not be drawn or was switched off."""
    pred = ml.predict(calibrated, thresholds)
    ml.error_cooccurrence_figure(ml.error_cooccurrence(y, pred), classes, paths.CONFUSION_PNG)
    ml.pr_curves_figure(y, calibrated, thresholds, classes, paths.PR_CURVES_PNG)
    from pipeline.plots import note_figure

    note_figure("Conformal prediction sets are for one class per image; a multi-label model's answer is already a "
                "set: the labels over their thresholds (see pr_curves.png)", paths.PREDICTION_SETS_PNG)
    errors = ml.most_confident_errors(y, calibrated, thresholds)
    kind = {"false positive": "said", "false negative": "missed"}
    misclassified_grid(prep.center_crop(x[errors["image"].to_numpy()]),
                       [f"{kind[k]} {classes[c]} ({p:.2f})" for k, c, p in
                        errors[["kind", "label", "probability"]].itertuples(index=False)],
                       paths.MISCLASSIFIED_PNG, n_test=len(y),
                       legend="said: a label over its threshold that is not true; missed: a true label under it")
    notes = [gradcam_labels(model, x, y, calibrated, thresholds, classes, prep),
             pictures.training_curves(params.plots.smoothing)]
    reliability(y, plain, calibrated, metrics["temperature"])
    first = np.asarray(y).argmax(axis=1)  # each image under its first label (an image with none: the first label)
    notes += pictures.inside(model, x, first, plain, classes, prep, params.evaluate)
    notes.append(label_issues(model, prep, classes, metrics["temperature"], thresholds, params.evaluate.label_issues))
    for note in filter(None, notes):
        print(f"evaluate: {note}")
    return [n for n in notes if n]


def reliability(y: np.ndarray, plain: np.ndarray, calibrated: np.ndarray, t: float) -> None:
    """Every (image, label) decision pooled as a two-way choice: its confidence is the larger of
    p and 1 − p, right when that side is the truth."""
    def pooled(p: np.ndarray) -> np.ndarray:
        flat = p.reshape(-1)
        return np.stack([1.0 - flat, flat], axis=1)
    truth = np.asarray(y).reshape(-1).astype(np.int64)
    panels = [("before calibration (T = 1)", pooled(plain), expected_calibration_error(pooled(plain), truth))]
    if t != 1.0:
        panels.append((f"after temperature scaling (T = {t:g}, one for all labels)", pooled(calibrated),
                       expected_calibration_error(pooled(calibrated), truth)))
    reliability_diagram(truth, panels, paths.RELIABILITY_PNG, ECE_BINS, unit="image × label decisions")


def gradcam_labels(model, x, y, probs, thresholds, classes: list[str], prep) -> str | None:
    """Grad-CAM of each predicted label (at most GRADCAM_LABELS, most probable first) of the
    GRADCAM_IMAGES test images with the most predicted labels; red titles: a false positive."""
    from pipeline.evaluation.gradcam import split_model
    from pipeline.plots import note_figure

    split = split_model(model, prep.image_size)
    if split is None:
        note = f"Grad-CAM skipped: {type(model).__name__} has no spatial feature map (e.g. a vision transformer)"
        note_figure(note, paths.GRADCAM_PNG)
        return note
    pred = ml.predict(probs, thresholds)
    images = np.argsort(-pred.sum(axis=1).astype(np.int64), kind="stable")[:GRADCAM_IMAGES]
    pairs = [(i, c) for i in images for c in np.argsort(-probs[i], kind="stable")[:GRADCAM_LABELS] if pred[i, c]]
    if not pairs:
        note = "Grad-CAM skipped: no test image has a label over its threshold"
        note_figure(note, paths.GRADCAM_PNG)
        return note
    idx, labels = np.array([i for i, _ in pairs]), np.array([c for _, c in pairs])
    from pipeline.evaluation.gradcam import grad_cam

    picked = np.array(prep.center_crop(x[idx]))
    device = next(model.parameters()).device
    heat, _ = grad_cam(model, prep.normalize(torch.from_numpy(picked).to(device)), torch.from_numpy(labels), split)
    wrong = np.array([not y[i, c] for i, c in pairs])
    titles = [f"{classes[c]} ({probs[i, c]:.2f}) · #{i}" for i, c in pairs]
    gradcam_grid(picked, heat.numpy(), titles, wrong, paths.GRADCAM_PNG, caption=(
        f"Grad-CAM per predicted label: where the model finds the evidence for each label over its threshold "
        f"(label (probability) · test image #), for the {len(images)} test images with the most labels; each image "
        "(left) beside its heat map (right); red: a label the image does not have (a false positive)."))
    return None


def label_issues(model, prep, classes: list[str], t: float, thresholds: np.ndarray, on: bool) -> str:
    """cleanlab's multi-label check (find_label_issues with multi_label=True) of the validation
    split under this model's calibrated probabilities: metrics/label_issues.{csv,png}."""
    from pipeline.evaluation import label_issues as li

    if not on:
        return pictures.label_issues(model, prep, classes, t, on)
    x, y = load_split("val")
    probs = sigmoid(scaled(predict_logits(model, x, prep), t))
    source = "validation split, probabilities of models/model.pt (multi-label)"
    table = multilabel_issue_table(y, probs, thresholds, classes, source)
    li.write_label_issues(table, paths.LABEL_ISSUES, source, len(y))
    label_sets = sorted(set(table["given"]) | set(table["suggested"]))  # the figure's titles name sets, not classes
    li.suspects_figure(pictures._crops(table, prep), table, label_sets, paths.LABEL_ISSUES_PNG)
    why = f" ({table.attrs['reason']})" if table.attrs.get("reason") else ""
    return f"label issues: {len(table)} of {len(y):,} images suspected{why}, from the {source}"


def multilabel_issue_table(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str],
                           source: str) -> pd.DataFrame:
    """The images cleanlab flags, most suspicious first, in label_issues.csv's columns: given and
    suggested are label sets (the suggestion: the labels over their thresholds), p_given and
    p_suggested the lowest probability within each set (1 for an empty set)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    given_lists = [list(np.flatnonzero(row)) for row in y]
    reason, ranked, quality = "", np.zeros(0, np.int64), np.zeros(len(y))
    try:
        ranked = np.asarray(find_label_issues(given_lists, probs, multi_label=True,
                                              return_indices_ranked_by="self_confidence", n_jobs=1), np.int64)
        quality = get_label_quality_scores(given_lists, probs)
    except (ValueError, IndexError) as exc:  # cleanlab's own input checks (e.g. a label never given)
        reason = f"cleanlab: {str(exc).splitlines()[0]}"
    pred = ml.predict(probs, thresholds)

    def lowest(row_p: np.ndarray, mask: np.ndarray) -> float:
        return float(row_p[mask.astype(bool)].min()) if mask.any() else 1.0
    table = pd.DataFrame({
        "rank": np.arange(1, len(ranked) + 1, dtype=np.int64), "split": "val", "index": ranked,
        "given": [label_text(y[i:i + 1], classes, ";")[0] for i in ranked],
        "suggested": [label_text(pred[i:i + 1], classes, ";")[0] for i in ranked],
        "p_given": [lowest(probs[i], y[i]) for i in ranked], "p_suggested": [lowest(probs[i], pred[i]) for i in ranked],
        "label_quality": quality[ranked] if len(ranked) else np.zeros(0), "source": source})
    table.attrs.update(reason=reason, warnings=[], source=source)
    return table
