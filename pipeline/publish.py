"""The report stage: the end of every pipeline run, whatever DVC skipped before it.

DVC skips a stage whose inputs came out byte-identical (a fresh clone re-trains to the same
models/model.pt, then skips evaluate and export) and restores a stage it has seen before from
its run cache without running it. So nothing that must happen on every run can live only in
train, evaluate or export. This stage runs last whenever anything before it changed, on a fresh
clone (its record, models/report.json, is in DVC's cache, not in git) and never from the run
cache (that record is `persist`), and:

1. finds this execution's MLflow run: the one train started when train ran in this execution
   (models/mlflow_run.json names it, for this very checkpoint, and it is not yet complete), else
   a new run recorded from DVC's outputs (params, curves, training summary), named the same way;
2. logs into it what train, evaluate and export produced: the headline figures, every figure in
   its description, the data splits as inputs, the files and pictures, the ONNX model (registered
   with `mlflow.register_model`);
3. writes metrics/report.md and report.html, which name that run;
4. prints the end-of-run block: the result, its change against the commit, where to look.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import runview, tracking

from pipeline.core import paths
from pipeline.core.io import atomic_path, file_sha256, files_sha256, read_json, write_json
from pipeline.evaluation.report import PICTURES, report_blocks, to_html, to_markdown
from pipeline.prepared import load_meta, load_split, split_files

# what train, evaluate and export write that the run holds as files (pictures: PICTURES)
TRAIN_FILES = [paths.TRAIN_METRICS, paths.TRAIN_HISTORY, paths.CROSSVAL_METRICS, paths.DATA_CARD,
               paths.DATA_CARD_MD, paths.DATA_CARD_PNG]
EVAL_FILES = [paths.EVAL_METRICS, paths.PER_CLASS, paths.PREDICTIONS, paths.CONFUSION_JSON, paths.LABEL_ISSUES]


def run(params) -> dict:
    """Complete this execution's MLflow run, write the report naming it, print the end block."""
    tracker = tracking.Tracker.open(params)  # an unusable store stops here (mlflow.required: false: untracked)
    done = Outputs()
    done.identity = identity(params, done)
    run_id, new = execution_run(tracker, done)
    with tracker.active_run(run_id) as mlflow:
        if new:
            record_training(mlflow, done)
            tracker.bind_run(paths.MLFLOW_RUN, paths.CHECKPOINT)  # only now is it this model's whole run
        log_results(mlflow, params, done)
        write_report(params, done, run_id)
        tracking.log_artifacts(mlflow, [paths.EVAL_REPORT_MD, paths.EVAL_REPORT_HTML])
        tracking.set_description(mlflow, done.identity.note + "\n\n" + runview.figures_note(
            evaluation=done.evaluation, training=done.training, export=done.export, crossval=done.crossval,
            report=str(paths.EVAL_REPORT_HTML)))
    if run_id:
        write_json(paths.MLFLOW_RUN, tracking.recorded_run(paths.MLFLOW_RUN) | {"complete": True})
    write_json(paths.PUBLISHED, {"checkpoint_sha256": done.checkpoint_sha256, "onnx_sha256": file_sha256(
        paths.ONNX_MODEL), "eval_sha256": file_sha256(paths.EVAL_METRICS)})
    from pipeline.endblock import end_block

    print(end_block(done.evaluation, done.identity, tracking.recorded_run(paths.MLFLOW_RUN) if run_id else None))
    from pipeline.endblock import headline

    key = headline(done.evaluation)[0]
    return {"run_id": run_id, "new_run": new, key: done.evaluation[key]}


class Outputs:
    """What train, evaluate and export wrote, read once."""

    def __init__(self):
        self.card = read_json(paths.ONNX_META)
        self.training, self.evaluation = read_json(paths.TRAIN_METRICS), read_json(paths.EVAL_METRICS)
        self.export = read_json(paths.EXPORT_METRICS)
        self.crossval = read_json(paths.CROSSVAL_METRICS) if paths.CROSSVAL_METRICS.exists() else None
        self.notes = read_json(paths.EVAL_NOTES) if paths.EVAL_NOTES.exists() else []
        self.checkpoint_sha256 = file_sha256(paths.CHECKPOINT)
        self.meta = load_meta()
        timing = read_json(paths.TRAIN_TIMING) if paths.TRAIN_TIMING.exists() else {}
        # train_timing.json is not a DVC output: it is this model's only when train made this checkpoint
        self.timing = timing if timing.get("checkpoint_sha256") == self.checkpoint_sha256 else None
        self.identity: runview.RunIdentity | None = None  # what names and describes the run (`identity`)


def identity(params, done: Outputs) -> runview.RunIdentity:
    """The run's name, tags, params and descriptions, as train gives them (`runview.run_identity`).
    Its `data_hash` tag is filled in only for a new run (`execution_run`): train's run has it, and
    hashing data/prepared reads every image once more."""
    return runview.run_identity(
        params, lr=float(done.training["lr"]), n_params=int(done.training["parameters"]),
        n_classes=len(done.card["classes"]), n_train=int(done.meta["counts"]["train"]),
        image_size=int(done.card["image_size"]), data_hash="", multilabel=done.card.get("task") == "multilabel")


def execution_run(tracker: tracking.Tracker, done: Outputs) -> tuple[str | None, bool]:
    """(this execution's run id, whether it is new): train's run when train made this checkpoint
    in this execution; else a new one. None when tracking is off."""
    if not tracker.on:
        return None, False
    recorded = tracking.recorded_run(paths.MLFLOW_RUN)
    ours = (recorded.get("checkpoint_sha256") == done.checkpoint_sha256 and not recorded.get("complete")
            and tracker.existing_run(recorded.get("run_id")) is not None)
    if ours:
        return recorded["run_id"], False
    who = done.identity
    print("report: train did not run for this model in this execution (DVC found it unchanged or restored it "
          "from its cache): recording the run from its outputs", flush=True)
    tags = who.tags | {"data_hash": files_sha256(sorted(paths.PREPARED_DIR.iterdir())), tracking.NOTE: who.note}
    run_id = tracker.start_run(who.experiment, who.name, who.params, tags, paths.MLFLOW_RUN,
                               experiment_tags=who.experiment_tags)
    return run_id, True


def record_training(mlflow, done: Outputs) -> None:
    """A new run's training part, from DVC's outputs: the curves (step = epoch), the summary,
    the cross-validation's figures; the training time only when this checkpoint's is known."""
    from pipeline.crossval.summary import summary_metrics

    history = pd.read_csv(paths.TRAIN_HISTORY)
    for row in history.to_dict(orient="records"):
        tracking.log_metrics(mlflow, runview.epoch_metrics(row), step=int(row["epoch"]))
    tracking.log_metrics(mlflow, runview.train_metrics(done.training, done.timing)
                         | summary_metrics(done.crossval or {"folds": 0}))
    if done.timing:
        tracking.log_diagnostics(mlflow, "train", done.timing)


def log_results(mlflow, params, done: Outputs) -> None:
    """Everything a run page shows besides training: test figures, inputs, files, the model."""
    if mlflow is None:
        return
    tracking.log_metrics(mlflow, runview.test_metrics(done.evaluation))
    tracking.set_tags(mlflow, {"checkpoint_sha256": done.checkpoint_sha256})
    tracking.log_inputs(mlflow, split_inputs(params, done))
    tracking.log_artifacts(mlflow, TRAIN_FILES + EVAL_FILES + [p for _, p in pictures(params)])
    tracking.log_artifacts(mlflow, [paths.ONNX_META, paths.EXPORT_METRICS], artifact_path="onnx")
    log_model(mlflow, params, done)


def split_inputs(params, done: Outputs) -> list[tuple[Any, str]]:
    """The three prepared splits as the run's inputs, each with its own digest; the source is
    the user's folder for a folder data set."""
    record = params.model_dump()
    source = str(Path(record["data_dir"]).resolve()) if record["dataset"] == "folder" else str(paths.PREPARED_DIR)
    name = done.identity.tags["dataset"]
    contexts = {"train": "training", "val": "validation", "test": "testing"}
    return [(runview.dataset_input(name, files_sha256(split_files(split)), source, split,
                                   int(done.meta["counts"][split]), int(done.card["stored_size"])), context)
            for split, context in contexts.items()]


def log_model(mlflow, params, done: Outputs) -> None:
    """The ONNX model as the run's logged model (with an input example from the test split),
    registered as a new version of `mlflow.register_model` with `mlflow.model_alias`."""
    from pipeline.export.runtime import session_providers
    from pipeline.core.preprocess import Preprocessing

    x, _ = load_split("test")
    example = Preprocessing.from_dict(done.card).model_input(np.array(x[:1]))
    register_as, alias = params.mlflow.register_model, params.mlflow.model_alias
    info = tracking.log_onnx_model(mlflow, paths.ONNX_MODEL, example, done.card, register_as, alias,
                                   providers=session_providers())
    if register_as and info is not None:
        print(f"report: registered {register_as} v{info.registered_model_version} @{alias}", flush=True)


def pictures(params) -> list[tuple[str, Path]]:
    """The report's pictures that exist (the augmentation picture only where training used it,
    the precision-recall curves only for labels: eval.json then has mAP)."""
    from pipeline.training.strategy import Strategy

    record = params.model_dump()
    strategy = Strategy(record["finetune"], augmented_passes=record["transfer"]["augmented_passes"])
    hidden = set() if strategy.trains_on_augmented_images else {paths.AUGMENTED_SAMPLES_PNG}
    if not (paths.EVAL_METRICS.exists() and "map_macro" in read_json(paths.EVAL_METRICS)):
        hidden.add(paths.PR_CURVES_PNG)
    return [(t, p) for t, p in PICTURES if p.exists() and p not in hidden]


def write_report(params, done: Outputs, run_id: str | None) -> None:
    """metrics/report.md and its self-contained twin report.html: they name the MLflow run, the
    date and the commit, so they differ from run to run and are not DVC outputs (report.md is
    in git beside its pictures; both are logged to the run)."""
    run = tracking.recorded_run(paths.MLFLOW_RUN) if run_id else None
    commit = tracking.git_commit()
    context = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit[:10] if commit else "",
               "DVC experiment": os.environ.get("DVC_EXP_NAME", "")}
    record = params.model_dump()
    shown = {k: v for k, v in record.items() if k != "data_dir" or record["dataset"] == "folder"}
    ckpt = {"arch": done.card["arch"], "classes": done.card["classes"], "preprocessing": done.card,
            "params": shown | {"dataset": done.identity.tags["dataset"]}}  # a folder's name; its path below
    per_class = pd.read_csv(paths.PER_CLASS)
    blocks = report_blocks(ckpt=ckpt, run=run, train_summary=done.training, metrics=done.evaluation,
                           per_class=per_class, pictures=pictures(params), notes=done.notes, context=context)
    with atomic_path(paths.EVAL_REPORT_MD) as tmp:
        tmp.write_text(to_markdown(blocks, paths.EVAL_REPORT_MD))
    with atomic_path(paths.EVAL_REPORT_HTML) as tmp:
        tmp.write_text(to_html(blocks))
