"""How a pipeline run reads in the MLflow UI: its name, tags and description, metric names in
sections, the data set as the run's input, and what stays out of the charts.

MLflow's UI (3.x) draws one chart section per metric-name prefix (the part before the last
"/") in plain sorted order, one-value metrics as bars, stepped ones as lines (checked in the
3.17 UI's code and in Chromium). So the per-epoch curves are `loss/train` beside `loss/val` and
`accuracy/train` beside `accuracy/val` ("accuracy" and "loss" sort first), the learning rate is
`schedule/lr`, and the few one-value figures people sort runs by follow in `test/…` (before
`train/…`). Every other one-value figure (the whole test table, the ONNX check, the training
summary) is in the run's description, a table on its page, and in the JSON artifacts: a chart
of one bar each tells a person nothing. Counts, threads and latency samples go to
`diagnostics/*.json`.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from pipeline.text import shorten

# history column -> MLflow metric (step = epoch)
CURVES = {"train_loss": "loss/train", "val_loss": "loss/val", "train_accuracy": "accuracy/train",
          "val_accuracy": "accuracy/val", "val_map": "map/val", "lr": "schedule/lr"}
# the one-value figures logged as metrics: what runs are sorted and compared by
TEST_HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "ece_calibrated", "accuracy_tta",
                 "accuracy_clean", "coverage", "set_size_mean",  # prediction sets (evaluate.conformal_alpha)
                 "map_macro", "map_micro", "f1_micro", "subset_accuracy", "hamming_loss", "map_macro_clean")  # multilabel
TRAIN_HEADLINE = {"best_val_accuracy": "train/best_val_accuracy", "best_val_map": "train/best_val_map"}
TRAIN_SPEED = {"train_seconds": "train/seconds"}
EXPORT_NAMES = {"top1_agreement": "top-1 agreement with PyTorch", "max_abs_logit_diff": "max |logit difference|",
                "n_checked": "test images checked", "onnx_bytes": "file size (bytes)",
                "exporter": "exporter (torchscript, else dynamo)"}
STRATEGIES = {"scratch": "from scratch", "full": "full fine-tuning", "linear_probe": "linear probe",
              "partial": "partial fine-tuning", "two_phase": "two-phase fine-tuning"}


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """One epoch's row of the history as MLflow metrics (the rest of the row is diagnostics), to 4
    significant digits (what a chart or the run page can show; a learning rate of 2.5e-06 stays)."""
    return {name: float(f"{float(row[key]):.4g}") for key, name in CURVES.items() if key in row}


def tidy(value: float) -> float:
    """A one-value figure as the UI should show it: 4 decimals (0.9477, not 0.94771241830065…;
    a test split of 10,000 images resolves 0.0001), 0.1 from 100 up. The files keep every digit."""
    return round(float(value), 4 if abs(value) < 100 else 1)


def train_metrics(summary: dict[str, Any], timing: dict[str, Any] | None) -> dict[str, float]:
    return ({name: tidy(summary[k]) for k, name in TRAIN_HEADLINE.items() if k in summary}
            | {name: round(float(timing[k]), 1) for k, name in TRAIN_SPEED.items() if timing and k in timing})


def test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"test/{k}": tidy(metrics[k]) for k in TEST_HEADLINE if k in metrics}


SHARED_VIEW = "best-first"  # the experiment's saved view of its runs table (`shared_view`)


def shared_view(multilabel: bool = False) -> dict[str, Any]:
    """The runs table as the pipeline's experiments open at `?viewStateShareKey=best-first`
    (MLflow's shared views: an experiment tag `mlflow.sharedViewState.<key>`): best test accuracy
    first (a multi-label data set's: best test mAP), with the columns that answer "which run is
    best, and what was it"."""
    tests = ("test/map_macro", "test/f1_micro") if multilabel else ("test/accuracy", "test/f1_macro")
    trains = [v for k, v in TRAIN_HEADLINE.items() if (k == "best_val_map") == multilabel]
    columns = (["attributes.`Dataset`"] + [f"metrics.`{m}`" for m in (*tests, *trains, *TRAIN_SPEED.values())]
               + ["tags.`model`", "tags.`strategy`"])
    return {"searchFilter": "", "orderByKey": f"metrics.`{tests[0]}`", "orderByAsc": False,
            "selectedColumns": columns}


def strategy(params: dict[str, Any]) -> str:
    """scratch, or how loaded weights are fine-tuned (`finetune`)."""
    return params["finetune"] if params.get("pretrained") or params.get("weights") else "scratch"


def committed_params(path: str = "params.yaml") -> dict[str, Any] | None:
    """params.yaml as committed at HEAD, flattened like `Params.flat()`; None outside git or
    when the committed file does not parse any more."""
    from pipeline.core.params import parse_params, read_yaml

    try:
        out = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return parse_params(read_yaml(out.stdout) or {}, f"HEAD:{path}", check_models=False).flat()
    except Exception:  # an old params.yaml that today's schema rejects: no comparison, not an error
        return None


def changed_params(now: dict[str, Any], committed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The params whose value differs from the committed params.yaml (None: unknown)."""
    if committed is None:
        return None
    return {k: v for k, v in now.items() if committed.get(k) != v}


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


NAMED = ("dataset", "data_dir", "model")  # in the run's name already


def run_name(model: str, dataset: str, changed: dict[str, Any] | None, limit: int = 90) -> str:
    """`model · data set · the params that differ from the commit`, e.g.
    `resnet18 · flowers · lr=0.001 epochs=30` (cut with … past `limit` characters)."""
    parts = [model, dataset]
    if changed := {k: v for k, v in (changed or {}).items() if k not in NAMED}:
        # a path by its file name: weights=tf_efficientnet_lite0.pth, not the folders it sits in
        parts.append(" ".join(f"{k}={short(v).rsplit('/', 1)[-1]}" for k, v in changed.items()))
    name = " · ".join(parts)
    return shorten(name, limit)


@dataclass(frozen=True)
class RunIdentity:
    """What names and describes one execution's run, the same whether train starts it or the
    report stage records it from DVC's outputs."""
    experiment: str
    name: str
    params: dict[str, Any]   # logged as the run's params
    tags: dict[str, str]
    note: str                # the description before any result is known
    experiment_tags: dict[str, str]  # the experiment's description and its runs table's view


def run_identity(params, *, lr: float, n_params: int, n_classes: int, n_train: int, image_size: int,
                 data_hash: str, multilabel: bool = False) -> RunIdentity:
    """`params`: this execution's params (`Params` or a stage's view of them: read as a record)."""
    from pipeline.data.registry import display_name
    from pipeline.tracking import run_tags

    record = params.model_dump()
    dataset = display_name(record["dataset"], record["data_dir"])
    changed = changed_params(params.flat(), committed_params())
    how = strategy(record)
    tags = (run_tags(dataset, record["model"], record["finetune"], record["pretrained"])
            | {"data_source": record["dataset"], "strategy": how, "data_hash": data_hash}
            | ({"data_dir": record["data_dir"]} if record["dataset"] == "folder" else {}))
    note = headline(model=record["model"], dataset=dataset, how=how, n_classes=n_classes, n_train=n_train,
                    image_size=image_size, lr=lr, changed=changed)
    logged = params.flat() | {"lr": lr, "lr_auto": record["lr"] == "auto", "model_parameters": n_params}
    import json

    from pipeline.tracking import NOTE

    experiment_tags = {NOTE: experiment_note(dataset, record),
                       f"mlflow.sharedViewState.{SHARED_VIEW}": json.dumps(shared_view(multilabel))}
    return RunIdentity(params.experiment_name(), run_name(record["model"], dataset, changed), logged, tags,
                       note, experiment_tags)


def headline(*, model: str, dataset: str, how: str, n_classes: int, n_train: int, image_size: int, lr: float,
             changed: dict[str, Any] | None) -> str:
    """The description's first paragraphs (Markdown): what ran, and what differs from the commit."""
    lines = [f"**{model}** on **{dataset}** ({n_classes} classes, {n_train:,} training images at {image_size} px): "
             f"{STRATEGIES.get(how, how)}, lr {lr:g}."]
    if changed is None:
        lines.append("Params: params.yaml's committed values could not be read (not a git checkout).")
    elif changed:
        lines.append("Differs from params.yaml at HEAD: " + ", ".join(f"`{k}={short(v)}`" for k, v in changed.items()))
    else:
        lines.append("Params: params.yaml as committed.")
    return "\n\n".join(lines)


def experiment_note(dataset: str, record: dict[str, Any]) -> str:
    """The experiment's description (its page's header)."""
    where = f" (`{record['data_dir']}`)" if record["dataset"] == "folder" else ""
    return (f"Image classification on **{dataset}**{where}: one run per `dvc repro` or `dvc exp run` of the "
            "pipeline, named `model · data set · params that differ from the commit` (the DVC experiment's name is "
            "the tag `dvc_exp_name`). Sort by `test/accuracy`; each run's page holds its figures, report and "
            "ONNX model. `python -m pipeline runs` shows the same runs in a terminal.")


def figures_note(*, evaluation: dict[str, Any], training: dict[str, Any], export: dict[str, Any],
                 crossval: dict[str, Any] | None, report: str) -> str:
    """The run's results as tables for its description: test, training, cross-validation,
    the ONNX check; every figure (the charts hold only the headline ones)."""
    from pipeline.evaluation.report import METRIC_NAMES, TRAIN_NAMES, number

    def table(title: str, rows: list[tuple[str, str]]) -> str:
        return f"**{title}**\n\n| | |\n|---|---:|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)

    parts = [table("Test split", [(METRIC_NAMES.get(k, k), number(v)) for k, v in evaluation.items()]),
             table("Training", [(TRAIN_NAMES.get(k, k.replace("_", " ")), number(v)) for k, v in training.items()
                                if isinstance(v, (int, float))])]
    if crossval and crossval.get("folds"):
        parts.append(table(f"Cross-validation ({crossval['folds']} folds, mean ± std)",
                           [(METRIC_NAMES.get(k, k), f"{v['mean']:.4f} ± {v['std']:.4f}")
                            for k, v in crossval.items() if k != "folds"]))
    parts.append(table("ONNX export, checked on the test split",
                       [(EXPORT_NAMES.get(k, k), number(v)) for k, v in export.items()]))
    return "\n\n".join(parts + [f"Report: `{report}` (also among this run's artifacts)."])


def dataset_input(name: str, digest: str, source: str, split: str, n_images: int, image_size: int) -> Any:
    """An MLflow data set entry (the runs table's Dataset column) for one prepared split:
    its name, the sha256 of its files as the digest, where it came from and its shape."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, image_size, image_size), name="image"),
                     TensorSpec(np.dtype(np.int64), (-1,), name="label")])
    return MetaDataset(LocalArtifactDatasetSource(source), name=f"{name}/{split} ({n_images:,} images)",
                       digest=digest[:16], schema=schema)
