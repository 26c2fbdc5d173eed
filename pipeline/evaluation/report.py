"""The evaluation report, one content in two forms: metrics/report.md (in git beside its pictures,
which are git-tracked DVC outputs, so it reads on GitHub and in every experiment's commit) and
metrics/report.html (the same page with the pictures inlined: one file that reads anywhere,
offline). The run, when and from which commit, its params, training summary, test metrics,
per-class table and pictures. (pipeline/data/card.py is the *data* card prepare writes; linked here.)

The content is a list of blocks (heading, paragraph, table, picture) rendered twice, so the
two files cannot drift apart."""
from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import paths

# The params shown in the report (dotted keys into the checkpoint's params); the rest are in
# params.yaml / the MLflow run.
KEY_PARAMS = ("dataset", "data_dir", "task", "model", "pretrained", "weights", "finetune", "image_size", "epochs", "batch_size", "lr",
              "seed", "train.optimizer", "train.scheduler", "train.weight_decay", "train.label_smoothing",
              "train.mixup_alpha", "train.cutmix_alpha", "train.class_weights", "train.sampler")

METRIC_NAMES = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy (mean recall per class)",
    "top5_accuracy": "top-5 accuracy", "precision_macro": "precision, macro", "recall_macro": "recall, macro",
    "f1_macro": "F1, macro", "precision_weighted": "precision, weighted by support",
    "recall_weighted": "recall, weighted by support", "f1_weighted": "F1, weighted by support",
    "log_loss": "log loss (lower is better)", "ece": "expected calibration error (15 bins; lower is better)",
    "n_test": "test images",
    "temperature": "temperature T (fitted on the validation split; 1 = not calibrated)",
    "log_loss_calibrated": "log loss of softmax(logits / T)", "ece_calibrated": "expected calibration error after T",
    "accuracy_tta": "accuracy with test-time augmentation", "balanced_accuracy_tta": "balanced accuracy with TTA",
    "f1_macro_tta": "F1, macro, with TTA", "log_loss_tta": "log loss with TTA", "ece_tta": "ECE with TTA",
    "tta_views": "TTA views averaged per image",
    "accuracy_clean": "accuracy on the clean test images (no near-duplicate or group member in train/val)",
    "accuracy_leaked": "accuracy on the test images that have one", "test_images_clean": "clean test images",
    "test_images_leaked": "test images with a near-duplicate in train/val",
}
# the same, short, for the terminal's table of the evaluate stage
SHORT_NAMES = {"balanced_accuracy": "balanced accuracy", "top5_accuracy": "top-5 accuracy",
               "precision_macro": "precision, macro", "recall_macro": "recall, macro", "f1_macro": "F1, macro",
               "precision_weighted": "precision, weighted", "recall_weighted": "recall, weighted",
               "f1_weighted": "F1, weighted", "log_loss": "log loss", "ece": "ECE", "n_test": "test images",
               "temperature": "temperature T", "log_loss_calibrated": "log loss after T", "ece_calibrated": "ECE after T",
               "accuracy_tta": "accuracy, TTA", "balanced_accuracy_tta": "balanced acc., TTA", "f1_macro_tta": "F1, TTA",
               "log_loss_tta": "log loss, TTA", "ece_tta": "ECE, TTA", "tta_views": "TTA views",
               "accuracy_clean": "accuracy, clean test", "accuracy_leaked": "accuracy, leaked test",
               "test_images_clean": "clean test images", "test_images_leaked": "leaked test images",
               "map_macro": "mAP, macro", "map_micro": "mAP, micro", "f1_micro": "F1, micro",
               "precision_micro": "precision, micro", "recall_micro": "recall, micro",
               "subset_accuracy": "subset accuracy", "hamming_loss": "Hamming loss",
               "labels_per_image": "labels per image", "predicted_labels_per_image": "predicted per image",
               "map_macro_clean": "mAP, clean test", "map_macro_leaked": "mAP, leaked test",
               "conformal_alpha": "sets: α", "conformal_threshold": "sets: q̂", "coverage": "sets: coverage",
               "set_size_mean": "sets: mean size", "set_size_median": "sets: median size",
               "singleton_share": "sets: one class", "singleton_accuracy": "accuracy, one-class sets"}
TRAIN_NAMES = {"best_val_accuracy": "best validation accuracy", "best_val_loss": "best validation loss",
               "best_val_map": "best validation mAP", "best_epoch": "best epoch", "epochs_run": "epochs run", "stopped_early": "stopped early",
               "parameters": "parameters", "lr": "learning rate"}


# (title, file): the report's pictures, in order
PICTURES = [("Learning curves", paths.LEARNING_CURVES_PNG), ("Confusion matrix", paths.CONFUSION_PNG),
            ("Most confidently misclassified", paths.MISCLASSIFIED_PNG),
            ("Precision-recall per label", paths.PR_CURVES_PNG),
            ("Prediction sets and abstention", paths.PREDICTION_SETS_PNG), ("Grad-CAM", paths.GRADCAM_PNG),
            ("Reliability (calibration)", paths.RELIABILITY_PNG), ("Inner activations", paths.ACTIVATIONS_PNG),
            ("Filters and what deeper channels respond to", paths.FILTERS_PNG),
            ("Embedding of the test split", paths.EMBEDDING_PNG), ("Suspected label issues", paths.LABEL_ISSUES_PNG),
            ("Augmented training samples", paths.AUGMENTED_SAMPLES_PNG)]


@dataclass(frozen=True)
class Block:
    kind: str                 # "h1", "h2", "h3", "p", "table", "img"
    text: str = ""            # heading / paragraph (with **bold** and `code`) / picture title
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: Path | None = None  # a picture


def number(value: Any) -> str:
    """A measured value, tidy: 4 decimals in [0.001, 1000), thousands separated above, 3
    significant digits with an exponent below; whole numbers as such; yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e3:
            return f"{value:.4f}"
        return f"{value:,.0f}" if abs(value) >= 1e3 else f"{value:.3g}"
    return str(value)


def setting(value: Any) -> str:
    """A param as it is written in params.yaml: 0.003, 1e-05, true, null, `sgd`."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(setting(v) for v in value) + "]"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _lookup(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "\0missing"
        node = node[part]
    return node


def _provenance(run: dict | None, context: dict[str, str]) -> str:
    parts = [f"{k} `{v}`" for k, v in context.items() if v]
    if run:
        parts.append(f"MLflow run `{run['run_id']}` in experiment `{run.get('experiment', '?')}`")
    return "; ".join(parts) + "." if parts else ""


def report_blocks(*, ckpt: dict, run: dict | None, train_summary: dict | None, metrics: dict,
                  per_class: pd.DataFrame, pictures: list[tuple[str, Path]], notes: list[str] = (),
                  context: dict[str, str] | None = None) -> list[Block]:
    """The report's content. `run`: models/mlflow_run.json or None; `train_summary`:
    metrics/train.json or None; `pictures`: (title, path), only those that exist are shown;
    `context`: e.g. {"date": ..., "commit": ..., "experiment": ...}."""
    params, prep = ckpt.get("params", {}), ckpt["preprocessing"]
    n_test = metrics.get("n_test", int(per_class["support"].sum()) if "support" in per_class else "?")
    labels = "map_macro" in metrics  # task=multilabel
    score = (f"test mAP (macro) **{number(float(metrics['map_macro']))}**, F1 (micro) at the validation thresholds "
             f"{number(float(metrics['f1_micro']))}" if labels else f"test accuracy **{number(float(metrics['accuracy']))}**")
    blocks = [Block("h1", "Evaluation report"),
              Block("p", f"Model `{ckpt['arch']}` on `{params.get('dataset', '?')}`: {len(ckpt['classes'])} "
                         f"{'labels' if labels else 'classes'}, "
                         f"{prep['image_size']}×{prep['image_size']} px, {n_test} test images; {score}"
                         + (f" ({number(float(metrics['accuracy_clean']))} on the {metrics['test_images_clean']:,} "
                            f"test images with no near-duplicate in train/val)" if "accuracy_clean" in metrics else "")
                         + "."),
              Block("p", f"The data: `{paths.DATA_CARD_MD}` (images per class and split, sizes, duplicates and "
                         "leakage, skipped files).")]
    if provenance := _provenance(run, context or {}):
        blocks.append(Block("p", provenance))
    blocks += [Block("h2", "Run"), Block("table", header=("param", "value"), rows=tuple(
        (k, setting(v)) for k in KEY_PARAMS if (v := _lookup(params, k)) != "\0missing"))]
    blocks.append(Block("h2", "Training"))
    if train_summary:
        blocks.append(Block("table", header=("", "value"), rows=tuple(
            (TRAIN_NAMES.get(k, k.replace("_", " ")), setting(v) if k == "lr" else number(v))
            for k, v in train_summary.items() if isinstance(v, (int, float, bool)))))
    else:
        blocks.append(Block("p", "No metrics/train.json here (train's outputs were not checked out)."))
    blocks += [Block("h2", "Test metrics"), Block("table", header=("metric", "value"), rows=tuple(
        (METRIC_NAMES.get(k, k), number(v)) for k, v in metrics.items()))]
    if labels:
        blocks += [Block("h2", "Per label"), Block("table", header=("label", "AP", "precision", "recall", "F1",
                                                                    "threshold", "support"),
                                                   rows=tuple((str(r["label"]), f"{r['ap']:.3f}", f"{r['precision']:.3f}",
                                                               f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                                                               f"{r['threshold']:.3f}", f"{int(r['support']):,}")
                                                              for _, r in per_class.iterrows()))]
    else:
        blocks += [Block("h2", "Per class"), Block("table", header=("class", "precision", "recall", "F1", "support"),
                                                   rows=tuple((str(r["class"]), f"{r['precision']:.3f}",
                                                               f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                                                               f"{int(r['support']):,}")
                                                              for _, r in per_class.iterrows()))]
    shown = [(title, p) for title, p in pictures if p.exists()]
    if shown:
        blocks.append(Block("h2", "Pictures"))
        for title, p in shown:
            blocks += [Block("h3", title), Block("img", title, path=p)]
    blocks += [Block("p", f"Note: {n}") for n in notes]
    return blocks


def to_markdown(blocks: list[Block], report_path: Path) -> str:
    """Pictures linked relative to the report's folder."""
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines += ["| " + " | ".join(b.header) + " |", "|---|" + "---:|" * (len(b.header) - 1)]
            lines += ["| " + " | ".join(r) + " |" for r in b.rows] + [""]
        elif b.kind == "img":
            rel = Path(os.path.relpath(b.path, report_path.parent)).as_posix()
            lines += [f"![{b.text}]({rel})", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em}"
         "td:not(:first-child){text-align:right}th{background:#f3f3f3}img{max-width:100%;height:auto}"
         "code{background:#f3f3f3;padding:0 .2em}")


def to_html(blocks: list[Block]) -> str:
    """One self-contained page: the pictures inlined as data URIs."""
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "img":
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">')
    title = html.escape(blocks[0].text if blocks else "Report")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def evaluation_report(*, report_path: Path, **content: Any) -> str:
    """The Markdown text (`report_blocks`' arguments, pictures relative to `report_path`)."""
    return to_markdown(report_blocks(**content), report_path)
