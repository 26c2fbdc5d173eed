"""MLflow: one run per pipeline execution, started by train, continued by evaluate and export.

The default store is `sqlite:///<repo root>/mlflow.db`, the root taken from `DVC_ROOT` so
that queued/temp experiments (which run in a temporary copy) log into the main store;
`MLFLOW_TRACKING_URI` overrides it. Logging is a side record: a stage's own outputs never
depend on it.
"""
from __future__ import annotations

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
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.repo_root() / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(dataset: str, model: str) -> dict[str, str]:
    tags = {"dataset": dataset, "model": model}
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


def start_run(experiment: str, params: dict[str, Any], tags: dict[str, str],
              run_file: Path = paths.MLFLOW_RUN) -> str:
    """Create the pipeline's run, log params and tags, record its id in `run_file`."""
    mlflow = _mlflow()
    _retry(mlflow.set_experiment, experiment)
    name = tags.get("dvc_exp_name") or f"{tags.get('model', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = _retry(mlflow.start_run, run_name=name, tags=tags)
    try:
        _retry(mlflow.log_params, params)
    finally:
        mlflow.end_run()
    write_json(run_file, {"run_id": run.info.run_id, "experiment": experiment,
                          "tracking_uri": tracking_uri()})
    return run.info.run_id


@contextmanager
def resume_run(run_file: Path = paths.MLFLOW_RUN) -> Iterator[Any]:
    """Re-open the run that train started, yielding the `mlflow` module to log with.

    If that run is not in the current store (another `MLFLOW_TRACKING_URI`, or DVC restored
    train's outputs from its cache), a new run in the same experiment is created instead."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    info = read_json(run_file)
    run_id = info["run_id"]
    try:
        mlflow.get_run(run_id)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the run lives in another store
        log.warning("MLflow run %s not found in %s; logging into a new run", run_id, tracking_uri())
        _retry(mlflow.set_experiment, info.get("experiment", "image-classification"))
        run_id = _retry(mlflow.start_run).info.run_id
        mlflow.end_run()
    with mlflow.start_run(run_id=run_id):
        yield mlflow


def log_metrics(mlflow: Any, metrics: dict[str, float], step: int | None = None) -> None:
    _retry(mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(mlflow: Any, files: list[Path], artifact_path: str | None = None) -> None:
    for f in files:
        _retry(mlflow.log_artifact, str(f), artifact_path=artifact_path)
