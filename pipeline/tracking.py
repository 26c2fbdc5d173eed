"""MLflow: one run per pipeline execution, started by train, continued by evaluate and export.

The default store is `sqlite:///<repo root>/mlflow.db`, the root taken from `DVC_ROOT` so
that queued/temp experiments (which run in a temporary copy) log into the main store;
`MLFLOW_TRACKING_URI` overrides it. Logging is a side record: a stage's own outputs never
depend on it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline import paths
from pipeline.io import read_json, write_json

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.repo_root() / paths.MLFLOW_DB}"


def _mlflow():
    import mlflow

    uri = tracking_uri()
    _create_sqlite_store_once(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def _create_sqlite_store_once(uri: str) -> None:
    """Create a new SQLite store under an exclusive file lock. Two queued experiments
    (`dvc queue start -j 2`) that both find no mlflow.db would otherwise run MLflow's schema
    migrations on the same file at once; after creation, SQLite's own locking (and `_retry`)
    is enough."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists() and db.stat().st_size > 0:
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + "-init.lock"), "w") as lock:  # git-ignored: mlflow.db-*
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)  # creates the schema (once: the others wait)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
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


def artifact_root() -> Path:
    """Where a local store keeps artifacts: `<repo root>/mlartifacts` (git-ignored)."""
    return paths.repo_root() / paths.MLFLOW_ARTIFACTS


def use_experiment(mlflow: Any, experiment: str) -> None:
    """Make `experiment` active, creating it if needed. With a local SQLite store, MLflow would
    fix the new experiment's artifact location at `./mlruns` of the *current directory*: for
    a queued experiment, a temporary copy that DVC deletes afterwards, taking every later
    run's artifacts and models with it. So a new experiment gets `<repo root>/mlartifacts`.
    A tracking server chooses its own artifact location."""
    if tracking_uri().startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
        from mlflow.exceptions import MlflowException

        try:
            _retry(mlflow.create_experiment, experiment, artifact_location=artifact_root().as_uri())
        except MlflowException:
            if mlflow.get_experiment_by_name(experiment) is None:  # not "a parallel run created it first"
                raise
    _retry(mlflow.set_experiment, experiment)


def start_run(experiment: str, params: dict[str, Any], tags: dict[str, str],
              run_file: Path = paths.MLFLOW_RUN) -> str:
    """Create the pipeline's run, log params and tags, record its id in `run_file`."""
    mlflow = _mlflow()
    use_experiment(mlflow, experiment)
    name = tags.get("dvc_exp_name") or f"{tags.get('model', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = _retry(mlflow.start_run, run_name=name, tags=tags)
    try:
        _retry(mlflow.log_params, params)
    finally:
        mlflow.end_run()
    write_json(run_file, {"run_id": run.info.run_id, "experiment": experiment,
                          "tracking_uri": tracking_uri()})
    return run.info.run_id


def bind_run(run_file: Path, checkpoint: Path) -> None:
    """Record in `run_file` which checkpoint its run trained (the file's sha256), so that
    evaluate and export continue this run only for that checkpoint."""
    write_json(run_file, read_json(run_file) | {"checkpoint_sha256": file_sha256(checkpoint)})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _run_to_continue(mlflow: Any, run_file: Path, checkpoint: Path | None) -> str | None:
    """The id of train's run, when `run_file` names one in this store for this checkpoint."""
    from mlflow.exceptions import MlflowException

    if not run_file.exists():
        return None
    info = read_json(run_file)
    if checkpoint is not None and info.get("checkpoint_sha256") != file_sha256(checkpoint):
        return None  # DVC restored train's outputs from its cache: the run file is another run's
    try:
        mlflow.get_run(info["run_id"])
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the run lives in another store
        return None
    return info["run_id"]


@contextmanager
def resume_run(run_file: Path = paths.MLFLOW_RUN, checkpoint: Path | None = None, experiment: str | None = None,
               params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Re-open the run that train started, yielding the `mlflow` module to log with.

    The run file is not a DVC output (it holds a run id: different every run), so it may be
    missing, or another run's when DVC restored train's outputs from its cache (its
    `checkpoint_sha256` then differs from `checkpoint`'s), or name a run of another store: a
    new run in the same experiment is started instead, with `params` (the checkpoint's)."""
    mlflow = _mlflow()
    run_id = _run_to_continue(mlflow, run_file, checkpoint)
    if run_id is None:
        info = read_json(run_file) if run_file.exists() else {}
        print(f"{os.environ.get('DVC_STAGE', 'mlflow')}: train's MLflow run is not in {tracking_uri()} for this "
              "checkpoint (DVC restored it from its cache, or another store); logging into a new run", flush=True)
        use_experiment(mlflow, experiment or info.get("experiment", "image-classification"))
        run = _retry(mlflow.start_run)
        if params:
            _retry(mlflow.log_params, params)
        run_id = run.info.run_id
        mlflow.end_run()
        write_json(run_file, {"run_id": run_id, "experiment": experiment or info.get("experiment"),
                              "tracking_uri": tracking_uri()} | ({"checkpoint_sha256": file_sha256(checkpoint)}
                                                                if checkpoint is not None else {}))
    with mlflow.start_run(run_id=run_id):
        yield mlflow


def log_metrics(mlflow: Any, metrics: dict[str, float], step: int | None = None) -> None:
    _retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(mlflow: Any, files: list[Path], artifact_path: str | None = None) -> None:
    for f in files:
        _retry(mlflow.log_artifact, str(f), artifact_path=artifact_path)


def log_onnx_model(mlflow: Any, path: Path, input_example: Any, output_example: Any, metadata: dict[str, Any],
                   register_as: str | None = None, alias: str = "candidate") -> Any:
    """Log the ONNX file at `path` as the active run's model `model` (MLflow 3 logged model,
    with signature, input example and `metadata` in its MLmodel file). With `register_as`,
    also register it as a new version of that registered model and point `alias` at it.
    Returns MLflow's ModelInfo (`model_uri`, `registered_model_version`)."""
    import onnx
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, output_example)
    info = _retry(mlflow.onnx.log_model, onnx.load(str(path)), name="model", signature=signature,
                  input_example=input_example, metadata=metadata, registered_model_name=register_as,
                  save_as_external_data=path.stat().st_size >= 2**31)  # one file unless over protobuf's 2 GB
    if register_as:
        _retry(mlflow.MlflowClient().set_registered_model_alias, register_as, alias, str(info.registered_model_version))
    return info
