"""What `pipeline ensemble` does: load the members, check they fit together and the prepared
data, weigh them (given, or fitted on val), score the ensemble and each member on the test split
with the evaluate stage's metrics, export one checked ONNX model with its card, write
metrics/ensemble.json, print the table and log an MLflow run "ensemble"."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import runview, tracking

from pipeline.checkpoint import predict_logits
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path, files_sha256, write_json
from pipeline.ensemble.members import Member, check_compatible, load_member
from pipeline.ensemble.model import build, ensemble_card, export_checked
from pipeline.ensemble.weights import fit_weights, parse_weights
from pipeline.evaluation.metrics import evaluation_metrics, probability_metrics
from pipeline.prepared import load_meta, load_split
from pipeline.probabilities import sigmoid, softmax

ENSEMBLE_ONNX, ENSEMBLE_METRICS = paths.ENSEMBLE_ONNX, paths.ENSEMBLE_METRICS  # its card: ensemble.json beside it


@dataclass
class EnsembleResult:
    report: dict                  # what metrics/ensemble.json holds
    probabilities: np.ndarray     # the ensemble's on the test split (N×K, float64)
    members: list[np.ndarray]     # each member's calibrated probabilities on the test split
    weights: np.ndarray


def calibrated(member: Member, x: np.ndarray) -> np.ndarray:
    """softmax(logits / T), or sigmoid(logits / T) per label for a multi-label member: the
    member's calibrated probabilities (float64) of stored images `x`."""
    z = predict_logits(member.model, x, member.prep).astype(np.float64) / member.temperature
    return sigmoid(z) if member.ckpt.get("task") == "multilabel" else softmax(z)


def run(specs: list[str], weights: str = "auto", out: Path = ENSEMBLE_ONNX, metrics_path: Path = ENSEMBLE_METRICS,
        prepared: Path = paths.PREPARED_DIR, track: bool = True) -> EnsembleResult:
    """Everything is checked before anything is written: a mistake writes nothing."""
    if len(specs) < 2:
        raise UserError("an ensemble needs at least 2 members (the same one twice is allowed)")
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: the file name must end in .onnx (pipeline predict runs a model by its suffix)")
    given = parse_weights(weights, len(specs))
    tracker = _tracker() if track else None  # an unusable store stops here, before any output is written
    members = [load_member(s) for s in specs]
    classes = load_meta(prepared)["classes"]
    (x_val, y_val), (x_test, y_test) = load_split("val", prepared), load_split("test", prepared)
    data_hash = files_sha256(sorted(prepared.iterdir()))  # as train records it in the checkpoint
    for warning in check_compatible(members, classes, data_hash, x_test.shape[-1], prepared):
        print(f"warning: {warning}", file=sys.stderr)
    val, test = [calibrated(m, x_val) for m in members], [calibrated(m, x_test) for m in members]
    w = given if given is not None else fit_weights(val, y_val)
    probs = sum(wi * p for wi, p in zip(w, test))
    thresholds = ensemble_thresholds(members, w, val, y_val)
    report = summary(members, w, given is None, val, test, probs, y_val, y_test, classes, thresholds)
    card = ensemble_card(members, w, thresholds)
    x_float = members[0].prep.model_input(np.array(x_test))
    with atomic_path(out) as tmp:
        report["onnx"] = {"path": str(out)} | export_checked(build(members, w), card, tmp, x_float, probs)
        write_json(out.with_suffix(".json"), card)
        write_json(metrics_path, report)
    print(table(report))
    print(f"ensemble: {out} (card {out.with_suffix('.json')}), {metrics_path}; ONNX Runtime agrees with PyTorch "
          f"(max |probability diff| {report['onnx']['max_abs_prob_diff']:.1e} on {report['onnx']['n_checked']} images)")
    if tracker:
        log_run(tracker, members, report, [metrics_path, out.with_suffix(".json")])
    return EnsembleResult(report, probs, test, w)


def ensemble_thresholds(members: list[Member], w: np.ndarray, val: list[np.ndarray], y_val: np.ndarray) -> np.ndarray | None:
    """Multi-label: the ensemble's own threshold per label, chosen on the validation split by
    member 0's train.thresholds rule (f1 or a precision); None for one class per image."""
    if members[0].ckpt.get("task") != "multilabel":
        return None
    from pipeline.evaluation.multilabel import choose_thresholds

    rule = ((members[0].ckpt.get("params") or {}).get("train") or {}).get("thresholds", "f1")
    return choose_thresholds(y_val, sum(wi * p for wi, p in zip(w, val)), rule)


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: np.ndarray | None) -> dict:
    """The evaluate stage's test metrics of these probabilities (multi-label: at `thresholds`)."""
    if thresholds is None:
        return evaluation_metrics(y, probs, classes)[0]
    from pipeline.evaluation.multilabel import multilabel_metrics

    return multilabel_metrics(y, probs, thresholds, classes)[0]


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    if np.ndim(y) == 2:
        from pipeline.evaluation.multilabel import probability_log_loss

        return probability_log_loss(y, probs)
    return probability_metrics(y, probs)["log_loss"]


def summary(members: list[Member], w: np.ndarray, fitted: bool, val: list[np.ndarray], test: list[np.ndarray],
            probs: np.ndarray, y_val: np.ndarray, y_test: np.ndarray, classes: list[str],
            thresholds: np.ndarray | None = None) -> dict:
    """The layout of metrics/ensemble.json (multi-label: members scored at their own thresholds,
    the ensemble at its own; `thresholds` beside them)."""
    about = [{"name": m.name, "source": m.source, "commit": m.commit, "arch": m.ckpt["arch"],
              "temperature": m.temperature, "weight": float(wi),
              "val_log_loss": log_loss(y_val, pv),
              "test": scores(y_test, pt, classes, None if thresholds is None else np.asarray(m.ckpt["thresholds"]))}
             for m, wi, pv, pt in zip(members, w, val, test)]
    extra = {} if thresholds is None else {"thresholds": [float(t) for t in thresholds]}
    return {"ensemble": scores(y_test, probs, classes, thresholds), **extra,
            "val_log_loss": log_loss(y_val, sum(wi * p for wi, p in zip(w, val))),
            "weights": [float(wi) for wi in w],
            "weights_from": "auto: fitted on the val split (least log loss)" if fitted else "given (--weights)",
            "n_val": len(y_val),
            "members": about}


def table(report: dict) -> str:
    """Member rows and the ensemble's: test accuracy, log loss, ECE, and the weight."""
    rows = [(m["name"], m["test"], f"{m['weight']:.4f}") for m in report["members"]]
    rows.append(("ensemble", report["ensemble"], "1"))
    width = max(8, *(len(name) for name, _, _ in rows))
    head = "map_macro" if "map_macro" in report["ensemble"] else "accuracy"
    lines = [f"{'member':<{width}}  {head:>9}  {'log_loss':>8}  {'ece':>6}  {'weight':>6}"]
    lines += [f"{name:<{width}}  {t[head]:>9.4f}  {t['log_loss']:>8.4f}  {t['ece']:>6.4f}  {weight:>6}"
              for name, t, weight in rows]
    n = report["ensemble"]["n_test"]
    return "\n".join(lines + [f"(test split, {n} images; weights {report['weights_from']})"])


def _tracker() -> tracking.Tracker:
    """The store and experiment of params.yaml's `mlflow` settings (`pipeline ensemble` is a
    command, not a DVC stage: it reads the file whole)."""
    from pipeline.core.params import load_params

    return tracking.Tracker.open(load_params(check_models=False))


def log_run(tracker: tracking.Tracker, members: list[Member], report: dict, files: list[Path]) -> None:
    """An MLflow run "ensemble" in the params' experiment: test/* metrics, the members and
    weights as params, the metrics and card JSON files as artifacts."""
    dataset = (members[0].ckpt.get("params") or {}).get("dataset", "data")
    tags = tracking.run_tags(dataset, "ensemble") | {"ensemble_members": ",".join(m.name for m in members)}
    with tracker.run_block(tracker.experiment, "ensemble", tags) as mlflow:
        tracking.log_params(mlflow, {"members": ",".join(m.name for m in members),
                                     "weights": ",".join(f"{w:.6g}" for w in report["weights"]),
                                     "weights_from": report["weights_from"].split(":")[0]})
        tracking.log_metrics(mlflow, runview.test_metrics(report["ensemble"]) | {"val/log_loss": report["val_log_loss"]})
        tracking.log_artifacts(mlflow, files, artifact_path="ensemble")
