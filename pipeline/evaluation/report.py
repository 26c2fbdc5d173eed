"""The evaluation report: one Markdown page (metrics/report.md) that reads on GitHub and without
MLflow: the run, its training summary, the test metrics, the per-class table and the pictures.
(pipeline/data/report.py is the *data* report that prepare writes.)"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

# The params shown in the report (dotted keys into the checkpoint's params); the rest are in
# params.yaml / the MLflow run.
KEY_PARAMS = ("dataset", "model", "pretrained", "finetune", "image_size", "epochs", "batch_size", "lr", "seed",
              "train.optimizer", "train.scheduler", "train.weight_decay", "train.label_smoothing",
              "train.mixup_alpha", "train.cutmix_alpha", "train.class_weights", "train.sampler")

METRIC_NAMES = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy (mean recall per class)",
    "top5_accuracy": "top-5 accuracy", "precision_macro": "precision, macro", "recall_macro": "recall, macro",
    "f1_macro": "F1, macro", "precision_weighted": "precision, weighted by support",
    "recall_weighted": "recall, weighted by support", "f1_weighted": "F1, weighted by support",
    "log_loss": "log loss (lower is better)", "ece": "expected calibration error (15 bins; lower is better)",
    "n_test": "test images",
}


def _lookup(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]


def evaluation_report(*, ckpt: dict, run: dict | None, train_summary: dict | None, metrics: dict,
                      per_class: pd.DataFrame, pictures: list[tuple[str, Path]], report_path: Path,
                      notes: list[str] = ()) -> str:
    """The Markdown text. `run`: models/mlflow_run.json (run_id, experiment) or None;
    `train_summary`: metrics/train.json or None; `pictures`: (title, path) pairs, only those
    that exist are linked, relative to `report_path`'s folder."""
    params, prep = ckpt.get("params", {}), ckpt["preprocessing"]
    lines = ["# Evaluation report", "",
             f"Model `{ckpt['arch']}` on `{params.get('dataset', '?')}`: {len(ckpt['classes'])} classes, "
             f"{prep['image_size']}×{prep['image_size']} px, {metrics['n_test']} test images; "
             f"test accuracy **{metrics['accuracy']:.4f}**.", ""]
    if run:
        lines += [f"MLflow run `{run['run_id']}` in experiment `{run.get('experiment', '?')}` "
                  "(`mlflow ui` shows it with these pictures as artifacts).", ""]
    lines += ["## Run", ""] + _table(("param", "value"), [(k, v) for k in KEY_PARAMS
                                                         if (v := _lookup(params, k)) is not None])
    lines += ["## Training", ""]
    if train_summary:
        lines += _table(("", "value"), [(k.replace("_", " "), v) for k, v in train_summary.items()
                                         if isinstance(v, (int, float, bool))])
    else:
        lines += ["No metrics/train.json here (train's outputs were not checked out).", ""]
    lines += ["## Test metrics", ""] + _table(("metric", "value"), [(METRIC_NAMES.get(k, k), v) for k, v in metrics.items()])
    lines += ["## Per class", "", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {int(r['support'])} |"
              for _, r in per_class.iterrows()] + [""]
    shown = [(title, p) for title, p in pictures if p.exists()]
    if shown:
        lines += ["## Pictures", ""]
        for title, p in shown:
            rel = Path(os.path.relpath(p, report_path.parent)).as_posix()
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines)
