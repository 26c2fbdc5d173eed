"""MLflow runs: one run per pipeline execution, started by train (which logs its curves live)
and completed by the report stage (`pipeline.publish`), whatever DVC skipped in between.

A stage opens its store once (`Tracker.open`, which `pipeline.mlstore` checks) and holds the
`Tracker`: it starts, continues and ends runs, each block yielding the `mlflow` module to log
with, or None when the stage runs untracked; the `log_*` functions take that and do nothing
with None. A run a killed process left RUNNING is ended as KILLED (`end_orphans`).
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import mlstore

from pipeline.core import paths
from pipeline.core.io import file_sha256, read_json, write_json
from pipeline.core.processes import process_gone, this_process
from pipeline.core.secrets import redact

NOTE = "mlflow.note.content"  # an experiment's or a run's description (Markdown) in the UI
PROCESS_TAG = "pipeline.process"  # "host pid start-time" of the process that has the run open
# MLflow 3's UI opens an experiment without this tag in its GenAI (tracing) view, which hides
# the runs table and the charts; "custom_model_development" opens the model-training view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(dataset: str, model: str, finetune: str = "full", pretrained: bool = False) -> dict[str, str]:
    """What the MLflow UI's run table needs to tell runs apart at a glance: model, data set,
    transfer strategy, the git commit, and the DVC experiment and its baseline."""
    tags = {"dataset": dataset, "model": model, "finetune": finetune, "pretrained": str(pretrained).lower()}
    if commit := git_commit():
        tags["git_commit"] = commit
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _retry(fn, *args, **kwargs):
    """SQLite allows one writer at a time: parallel queued experiments can briefly see
    'database is locked'. Retry a few times with backoff before giving up."""
    for attempt in range(8):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlalchemy's OperationalError in several types
            if "locked" not in str(exc) or attempt == 7:
                raise
            time.sleep(0.25 * 2**attempt)


def recorded_run(run_file: Path) -> dict:
    """What `run_file` holds (run_id, experiment, tracking_uri, checkpoint_sha256, complete), or {}."""
    return read_json(run_file) if run_file.exists() else {}


class Tracker:
    """A stage's MLflow store, checked once (`open`) for its `experiment`. `on` is False when the
    store is unusable and `mlflow.required: false` let the stage go on: each method then does
    nothing (or yields None)."""

    def __init__(self, on: bool, experiment: str):
        self.on, self.experiment = on, experiment

    @classmethod
    def open(cls, params: Any) -> Tracker:
        """The store of the stage with `params` (`Params` or the stage's view), checked: an unusable
        one stops the stage here in one line (`mlflow.required: true`, which the stage declares),
        before any output is written."""
        experiment = params.experiment_name()
        return cls(mlstore.usable(params.mlflow.required, experiment), experiment)

    def start_run(self, experiment: str, name: str, params: dict[str, Any], tags: dict[str, str],
                  run_file: Path = paths.MLFLOW_RUN, resuming: bool = False,
                  experiment_tags: dict[str, str] | None = None) -> str | None:
        """Create this execution's run (`name`, params, tags), record its id in `run_file`; None
        when tracking is off. A run a killed training left RUNNING is continued when training
        resumes from that training's checkpoint (`resuming`), else ended as KILLED."""
        if not self.on:
            return None
        mlflow = mlstore.connect()
        if interrupted := _interrupted_run(mlflow, run_file):
            if resuming:
                print(f"train: continuing the MLflow run {interrupted.info.run_id} of the interrupted training",
                      flush=True)
                return interrupted.info.run_id
            end_killed(mlflow.MlflowClient(), interrupted)
        experiment_id = use_experiment(mlflow, experiment, experiment_tags)
        run = _retry(mlflow.start_run, run_name=name, tags=tags | {PROCESS_TAG: this_process()})
        try:
            _retry(mlflow.log_params, params)
        finally:
            mlflow.end_run()
        write_json(run_file, {"run_id": run.info.run_id, "experiment": experiment, "experiment_id": experiment_id,
                              "tracking_uri": redact(mlstore.tracking_uri())})
        return run.info.run_id

    def bind_run(self, run_file: Path, checkpoint: Path) -> None:
        """Record in `run_file` which checkpoint its run trained (the file's sha256): the report
        stage completes this run only for that checkpoint."""
        if self.on and run_file.exists():
            write_json(run_file, read_json(run_file) | {"checkpoint_sha256": file_sha256(checkpoint)})

    def existing_run(self, run_id: str | None) -> Any:
        """The run `run_id` of this store, or None (no id, another store's, tracking off)."""
        from mlflow.exceptions import MlflowException

        if run_id is None or not self.on:
            return None
        try:
            return _retry(mlstore.connect().get_run, run_id)
        except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the run lives in another store
            return None

    @contextmanager
    def active_run(self, run_id: str | None) -> Iterator[Any]:
        """Re-open the run `run_id`, yielding the `mlflow` module to log with (None when tracking
        is off or there is no run). The run ends with the block: FINISHED, or FAILED on an error
        or an interruption (Ctrl-C, SIGTERM), never left RUNNING."""
        if run_id is None or not self.on:
            yield None
            return
        mlflow = mlstore.connect()
        with mlflow.start_run(run_id=run_id):
            _retry(mlflow.set_tag, PROCESS_TAG, this_process())  # a kill -9 now leaves it to `end_orphans`
            yield mlflow

    @contextmanager
    def run_block(self, experiment: str, name: str, tags: dict[str, str]) -> Iterator[Any]:
        """A run of its own for the block (an ensemble's): yields `mlflow`, or None when tracking is off."""
        if not self.on:
            yield None
            return
        mlflow = mlstore.connect()
        use_experiment(mlflow, experiment)
        with _retry(mlflow.start_run, run_name=name, tags=tags | {PROCESS_TAG: this_process()}):
            yield mlflow

    @contextmanager
    def parent_run(self, experiment: str, name: str, tags: dict[str, str], key: str) -> Iterator[Any]:
        """The run of `experiment` tagged `key` = tags[key], continued (a resumed search), else a new
        one; yields `mlflow` with it active (None when tracking is off). Its children are other
        processes' runs tagged `mlflow.parentRunId`."""
        if not self.on:
            yield None
            return
        mlflow = mlstore.connect()
        use_experiment(mlflow, experiment)
        found = _retry(mlflow.search_runs, experiment_names=[experiment],
                       filter_string=f"tags.{key} = '{tags[key]}'", output_format="list", max_results=1)
        run_id = found[0].info.run_id if found else None
        with _retry(mlflow.start_run, run_id=run_id, run_name=None if run_id else name,
                    tags=tags | {PROCESS_TAG: this_process()}):
            yield mlflow


@contextmanager
def child_run(mlflow: Any, name: str, tags: dict[str, str]) -> Iterator[Any]:
    """A run nested under the active one (a fold of cross-validation), for the block; `mlflow`:
    what the parent's block yielded (None: untracked, and so is the child)."""
    if mlflow is None:
        yield None
        return
    with _retry(mlflow.start_run, run_name=name, tags=tags | {PROCESS_TAG: this_process()}, nested=True):
        yield mlflow


def last_step(run_id: str, metric: str) -> int:
    """The last step of `metric` logged to the run (0: none)."""
    history = _retry(mlstore.connect().MlflowClient().get_metric_history, run_id, metric)
    return max((m.step for m in history), default=0)


def use_experiment(mlflow: Any, experiment: str, tags: dict[str, str] | None = None) -> str:
    """Make `experiment` active, creating it if needed, with `tags` (its description, `NOTE`,
    only when it has none yet: a person may have edited it); return its id. With a local SQLite store, MLflow
    would fix the new experiment's artifact location at `./mlruns` of the *current directory*:
    for a queued experiment, a temporary copy that DVC deletes afterwards, taking every later
    run's artifacts and models with it. So a new experiment gets `<repo root>/mlartifacts`.
    A tracking server chooses its own artifact location."""
    if mlstore.tracking_uri().startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
        from mlflow.exceptions import MlflowException

        try:
            _retry(mlflow.create_experiment, experiment, artifact_location=mlstore.artifact_root().as_uri(),
                   tags=EXPERIMENT_KIND)
        except MlflowException:
            if mlflow.get_experiment_by_name(experiment) is None:  # not "a parallel run created it first"
                raise
    found = _retry(mlflow.set_experiment, experiment)
    wanted = EXPERIMENT_KIND | {k: v for k, v in (tags or {}).items() if k != NOTE or not found.tags.get(NOTE)}
    for key, value in wanted.items():  # made elsewhere, or by an older version
        if found.tags.get(key) != value:
            _set_experiment_tag(mlflow.MlflowClient(), found.experiment_id, key, value)
    end_orphans(mlflow, found.experiment_id)
    return found.experiment_id


def _set_experiment_tag(client: Any, experiment_id: str, key: str, value: str) -> None:
    """Set an experiment's tag. Runs that start at once (`dvc queue start -j 2`) may each find a tag
    missing and each add it: MLflow's SQLite store then refuses the later insert (UNIQUE constraint
    failed). The tag exists by then, and setting it again updates it."""
    from mlflow.exceptions import MlflowException

    try:
        _retry(client.set_experiment_tag, experiment_id, key, value)
    except MlflowException as exc:
        if "UNIQUE constraint failed" not in str(exc):
            raise
        _retry(client.set_experiment_tag, experiment_id, key, value)


def end_orphans(mlflow: Any, experiment_id: str) -> None:
    """End as KILLED the runs of the experiment left RUNNING by a process that is gone (killed
    by kill -9, a power cut: nothing of it could end them)."""
    client = mlflow.MlflowClient()
    running = _retry(client.search_runs, [experiment_id], filter_string="attributes.status = 'RUNNING'",
                     max_results=1000)
    for run in running:
        if (owner := run.data.tags.get(PROCESS_TAG)) and process_gone(owner):
            end_killed(client, run)


def end_killed(client: Any, run: Any) -> None:
    _retry(client.set_terminated, run.info.run_id, "KILLED")
    print(f"mlflow: run {run.info.run_name!r} ({run.info.run_id[:12]}) was left RUNNING by a process that was "
          "killed: ended as KILLED", flush=True)


def _interrupted_run(mlflow: Any, run_file: Path) -> Any:
    """The run of `run_file` if a killed stage left it RUNNING in this store."""
    from mlflow.exceptions import MlflowException

    if (run_id := recorded_run(run_file).get("run_id")) is None:
        return None
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.status == "RUNNING" else None


# ---------------------------------------------------------------- logging into the active run
# `mlflow`: what a run block yielded; None (untracked) makes each call a no-op


def log_params(mlflow: Any, params: dict[str, Any]) -> None:
    if mlflow is not None:
        _retry(mlflow.log_params, params)


def log_metrics(mlflow: Any, metrics: dict[str, float], step: int | None = None) -> None:
    if mlflow is None:
        return
    _retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(mlflow: Any, files: list[Path], artifact_path: str | None = None) -> None:
    """Each file under its own name (in `artifact_path`); files that are not there are skipped."""
    if mlflow is None:
        return
    for f in files:
        if Path(f).exists():
            _retry(mlflow.log_artifact, str(f), artifact_path=artifact_path)


def log_diagnostics(mlflow: Any, stage: str, values: dict[str, Any]) -> None:
    """Numbers that are not results (counts, threads, latency samples): `diagnostics/STAGE.json`
    of the run, not metrics, so that the UI's charts and columns hold only what runs compare on."""
    if mlflow is not None:
        _retry(mlflow.log_dict, values, f"diagnostics/{stage}.json")


def set_tags(mlflow: Any, tags: dict[str, str]) -> None:
    if mlflow is not None:
        _retry(mlflow.set_tags, tags)


def set_description(mlflow: Any, text: str) -> None:
    """The run's description (Markdown), shown at the top of its page in the UI."""
    if mlflow is not None:
        _retry(mlflow.set_tag, NOTE, text)


def log_inputs(mlflow: Any, datasets: list[tuple[Any, str]]) -> None:
    """(MLflow data set, context) pairs as the run's inputs (the runs table's Dataset column)."""
    if mlflow is not None:
        for dataset, context in datasets:
            _retry(mlflow.log_input, dataset, context=context)


def onnx_model_requirements() -> list[str]:
    """What serving the logged ONNX model needs, pinned to this environment: the list MLflow
    infers by importing the model in a child Python (3-4 s of every report stage), given instead."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "numpy", "onnx", "onnxruntime")]


def onnx_signature(model: Any) -> Any:
    """The MLflow signature an ONNX model declares: each graph input and output as a tensor of
    its type and shape (a named, unknown dimension such as the batch: -1). Read from the graph,
    not inferred from a run of it: no session, and the shapes the graph promises."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    def schema(values) -> Schema:
        return Schema([TensorSpec(np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                                  tuple(d.dim_value if d.HasField("dim_value") else -1
                                        for d in v.type.tensor_type.shape.dim), v.name) for v in values])
    return ModelSignature(schema(model.graph.input), schema(model.graph.output))


def log_onnx_model(mlflow: Any, path: Path, input_example: Any, metadata: dict[str, Any],
                   register_as: str | None = None, alias: str = "candidate", providers: list[str] | None = None) -> Any:
    """Log the ONNX file at `path` as the active run's model `model` (MLflow 3 logged model,
    with its signature (`onnx_signature`), input example and `metadata` in its MLmodel file).
    With `register_as`, also register it as a new version of that registered model and point
    `alias` at it. `providers`: the ONNX Runtime providers it is loaded with (MLflow's default
    names CUDA and warns on every CPU-only load). Returns MLflow's ModelInfo (`model_uri`,
    `registered_model_version`); None untracked."""
    if mlflow is None:
        return None
    import onnx

    model = onnx.load(str(path))
    info = _retry(mlflow.onnx.log_model, model, name="model", signature=onnx_signature(model),
                  onnx_execution_providers=providers, pip_requirements=onnx_model_requirements(),
                  input_example=input_example, metadata=metadata, registered_model_name=register_as,
                  save_as_external_data=path.stat().st_size >= 2**31)  # one file unless over protobuf's 2 GB
    if register_as:
        _retry(mlflow.MlflowClient().set_registered_model_alias, register_as, alias, str(info.registered_model_version))
    return info
