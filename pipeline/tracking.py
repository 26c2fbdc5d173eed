"""MLflow: one run per pipeline execution, started by train (which logs its curves live) and
completed by the report stage (`pipeline.publish`), whatever DVC skipped in between.

The default store is `sqlite:///<repo root>/mlflow.db`, the root taken from `DVC_ROOT` so
that queued/temp experiments (which run in a temporary copy) log into the main store;
`MLFLOW_TRACKING_URI` overrides it. Logging is a side record: a stage's own outputs never
depend on it.

The store is probed once per process, briefly (`store_problem`: a server asked for one experiment, with a
5 s timeout; a SQLite file's integrity and write access), before anything is logged; MLflow's
own HTTP retries are capped so that a server lost mid-run fails a call in ~30 s, not minutes.
An unusable store stops the stage in one line, or, with `mlflow.required: false`, the run goes
on untracked (one warning): every logging call below is then a no-op (`mlflow` is None).
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline import paths
from pipeline.io import file_sha256, read_json, write_json
from pipeline.processes import process_gone, this_process
from pipeline.secrets import redact

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    """The store's URI. A server's credentials given in the URI (http://user:password@host) are
    moved to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, where MLflow reads them, so
    that the URI every record and message holds has none; a database URI keeps its own (its
    driver needs them there) and is recorded and printed through `secrets.redact`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.repo_root() / paths.MLFLOW_DB}"
    if uri.startswith(("http://", "https://")) and "@" in urlsplit(uri).netloc:
        parts = urlsplit(uri)
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
        os.environ["MLFLOW_TRACKING_URI"] = uri  # the processes this one starts inherit it so
    return uri


# a URL scheme's database driver (the module SQLAlchemy imports) → the package that provides it
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]' (or psycopg2-binary, with a postgresql+psycopg2:// URL)",
                   "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL", "MySQLdb": "mysqlclient", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "pyodbc": "pyodbc", "oracledb": "oracledb", "cx_Oracle": "oracledb"}


def driver_problem(uri: str) -> str | None:
    """Why the database URL `uri` (postgresql://, mysql+pymysql://, ...) cannot be opened here: an
    unknown dialect, a bad URL, or a driver that is not installed (with the package to install);
    None when SQLAlchemy can make an engine for it (no connection is made)."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError

    try:
        sqlalchemy.create_engine(uri)
    except ModuleNotFoundError as exc:
        package = DRIVER_PACKAGES.get(str(exc.name).split(".")[0], exc.name)
        return f"{redact(uri)} needs the database driver {exc.name!r}, which is not installed: pip install {package}"
    except (ArgumentError, ValueError) as exc:
        return f"{redact(uri)} is not a database URL SQLAlchemy can open ({str(exc).splitlines()[0]})"
    return None


PROBE_TIMEOUT_S = 5
# MLflow's client retries an unreachable server for minutes by default; these bound a call
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # the end block gives the run's page
_enabled: bool | None = None  # decided once per process by `enabled()`


def store_problem(uri: str | None = None) -> str | None:
    """What is wrong with the tracking store, in a few words; None when it is usable."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return _server_problem(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return _sqlite_problem(db) or (None if os.environ.get("MLFLOW_TRACKING_URI") else _moved_store_problem(db))
    if "://" in uri and not uri.startswith(("file:", "databricks")):
        return driver_problem(uri)  # a database: its driver is checked; the connection is MLflow's business
    return None  # other stores (Databricks): MLflow's own errors, bounded by _HTTP_LIMITS


def _server_problem(uri: str) -> str | None:
    """A tracking server asked once for one experiment, with the credentials MLflow would send:
    it is there, it is MLflow, and it lets this user in (its /health would not say)."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user or password:
        token = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            return None if response.status == 200 else f"the MLflow tracking server {uri} answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        hint = ": check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" if exc.code in (401, 403) else ""
        return f"the MLflow tracking server {uri} answered HTTP {exc.code} {exc.reason}{hint}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"cannot reach the MLflow tracking server {uri} ({getattr(exc, 'reason', exc)})"


def _sqlite_problem(db: Path) -> str | None:
    import sqlite3

    if not db.exists():
        folder = db.parent if db.parent.exists() else db.parent.parent
        return None if os.access(folder, os.W_OK) else f"cannot create the MLflow store {db}: {folder} is not writable"
    if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
        return f"the MLflow store {db} is read-only (it and its folder must be writable)"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S) as con:
            ok = con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError as exc:
        return f"the MLflow store {db} is damaged ({exc}); move it aside (mv {db} {db}.damaged) to start a new one"
    return None if ok else f"the MLflow store {db} fails SQLite's integrity check; move it aside to start a new one"


def _moved_store_problem(db: Path) -> str | None:
    """The repository's own store names, for this experiment, an artifact folder outside the
    repository: MLflow fixes an experiment's artifact location (an absolute path) when it is
    created, so a repository moved or copied with its mlflow.db would write its artifacts into
    the old folder (or fail where that is gone)."""
    import sqlite3
    from urllib.parse import unquote, urlparse

    if not db.exists() or not paths.PARAMS.exists():
        return None
    from pipeline.params import load_params

    name = load_params(check_models=False).experiment_name()
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S) as con:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (name,)).fetchone()
    except sqlite3.DatabaseError:
        return None  # a store without MLflow's tables yet: MLflow creates them
    if row is None or not str(row[0]).startswith("file:"):
        return None
    location = Path(unquote(urlparse(row[0]).path))
    if location.resolve().is_relative_to(paths.repo_root()):
        return None
    return (f"the MLflow experiment {name!r} in {db} keeps its artifacts in {location}, outside this repository "
            f"({paths.repo_root()}): the repository was moved or copied with its store. Move the store aside "
            f"(mv {db.name} {db.name}.moved) to start a new one here, or set mlflow.experiment to a new name")


def required() -> bool:
    """`mlflow.required` of params.yaml (a setting of the side record, not an input of any output)."""
    from pipeline.params import load_params

    return load_params(check_models=False).mlflow.required


def bound_http_retries() -> None:
    """MLflow's client retries an unreachable server for minutes: bound each call (`_HTTP_LIMITS`)."""
    for key, value in _HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def enabled() -> bool:
    """Whether this process logs to MLflow: the store is usable, or it is not and
    `mlflow.required: false` lets the stage go on without it (said once). Otherwise one line."""
    global _enabled
    if _enabled is None:
        bound_http_retries()
        problem = store_problem()
        if problem and required():
            from pipeline.errors import UserError

            raise UserError(f"{problem}; fix it or MLFLOW_TRACKING_URI, or set mlflow.required: false to run "
                            "without tracking")
        if problem:
            print(f"warning: {problem}; mlflow.required is false, so this stage runs without tracking", flush=True)
        _enabled = problem is None
    return _enabled


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
        if db.exists() and db.stat().st_size > 0:  # another process made it while this one waited
            return
        # made under another name and renamed when whole: a migration that fails half-way (a full
        # disk) leaves no half-made store that every later run would stumble on
        new = db.with_name(db.name + "-new")
        new.unlink(missing_ok=True)
        try:
            MlflowClient(f"sqlite:///{new}").search_experiments(max_results=1)  # creates the schema
            os.replace(new, db)
        finally:
            new.unlink(missing_ok=True)


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


# MLflow 3's UI opens an experiment without this tag in its GenAI (tracing) view, which hides
# the runs table and the charts; "custom_model_development" opens the model-training view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def use_experiment(mlflow: Any, experiment: str, tags: dict[str, str] | None = None) -> str:
    """Make `experiment` active, creating it if needed, with `tags` (its description, `NOTE`,
    only when it has none yet: a person may have edited it); return its id. With a local SQLite store, MLflow
    would fix the new experiment's artifact location at `./mlruns` of the *current directory*:
    for a queued experiment, a temporary copy that DVC deletes afterwards, taking every later
    run's artifacts and models with it. So a new experiment gets `<repo root>/mlartifacts`.
    A tracking server chooses its own artifact location."""
    if tracking_uri().startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
        from mlflow.exceptions import MlflowException

        try:
            _retry(mlflow.create_experiment, experiment, artifact_location=artifact_root().as_uri(),
                   tags=EXPERIMENT_KIND)
        except MlflowException:
            if mlflow.get_experiment_by_name(experiment) is None:  # not "a parallel run created it first"
                raise
    found = _retry(mlflow.set_experiment, experiment)
    wanted = EXPERIMENT_KIND | {k: v for k, v in (tags or {}).items() if k != NOTE or not found.tags.get(NOTE)}
    for key, value in wanted.items():  # made elsewhere, or by an older version
        if found.tags.get(key) != value:
            _retry(mlflow.MlflowClient().set_experiment_tag, found.experiment_id, key, value)
    end_orphans(mlflow, found.experiment_id)
    return found.experiment_id


NOTE = "mlflow.note.content"  # an experiment's or a run's description (Markdown) in the UI


PROCESS_TAG = "pipeline.process"  # "host pid start-time" of the process that has the run open


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


def recorded_run(run_file: Path) -> dict:
    """What `run_file` holds (run_id, experiment, tracking_uri, checkpoint_sha256, complete), or {}."""
    return read_json(run_file) if run_file.exists() else {}


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


def start_run(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str],
              run_file: Path = paths.MLFLOW_RUN, resuming: bool = False,
              experiment_tags: dict[str, str] | None = None) -> str | None:
    """Create this execution's run (`name`, params, tags), record its id in `run_file`; None
    when tracking is off. A run a killed training left RUNNING is continued when training
    resumes from that training's checkpoint (`resuming`), else ended as KILLED."""
    if not enabled():
        return None
    mlflow = _mlflow()
    if interrupted := _interrupted_run(mlflow, run_file):
        if resuming:
            print(f"train: continuing the MLflow run {interrupted.info.run_id} of the interrupted training", flush=True)
            return interrupted.info.run_id
        end_killed(mlflow.MlflowClient(), interrupted)
    experiment_id = use_experiment(mlflow, experiment, experiment_tags)
    run = _retry(mlflow.start_run, run_name=name, tags=tags | {PROCESS_TAG: this_process()})
    try:
        _retry(mlflow.log_params, params)
    finally:
        mlflow.end_run()
    write_json(run_file, {"run_id": run.info.run_id, "experiment": experiment, "experiment_id": experiment_id,
                          "tracking_uri": redact(tracking_uri())})
    return run.info.run_id


def last_step(run_id: str, metric: str) -> int:
    """The last step of `metric` logged to the run (0: none)."""
    history = _retry(_mlflow().MlflowClient().get_metric_history, run_id, metric)
    return max((m.step for m in history), default=0)


def bind_run(run_file: Path, checkpoint: Path) -> None:
    """Record in `run_file` which checkpoint its run trained (the file's sha256): the report
    stage completes this run only for that checkpoint."""
    if enabled() and run_file.exists():
        write_json(run_file, read_json(run_file) | {"checkpoint_sha256": file_sha256(checkpoint)})


def existing_run(run_id: str | None) -> Any:
    """The run `run_id` of this store, or None (no id, another store's, tracking off)."""
    from mlflow.exceptions import MlflowException

    if run_id is None or not enabled():
        return None
    try:
        return _retry(_mlflow().get_run, run_id)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the run lives in another store
        return None


@contextmanager
def active_run(run_id: str | None) -> Iterator[Any]:
    """Re-open the run `run_id`, yielding the `mlflow` module to log with (None when tracking
    is off or there is no run). The run ends with the block: FINISHED, or FAILED on an error
    or an interruption (Ctrl-C, SIGTERM), never left RUNNING."""
    if run_id is None or not enabled():
        yield None
        return
    mlflow = _mlflow()
    with mlflow.start_run(run_id=run_id):
        _retry(mlflow.set_tag, PROCESS_TAG, this_process())  # a kill -9 now leaves it to `end_orphans`
        yield mlflow


@contextmanager
def run_block(experiment: str, name: str, tags: dict[str, str], nested: bool = False) -> Iterator[Any]:
    """A run of its own for the block (an ensemble's run; with `nested`, a child of the active
    one, e.g. a fold of cross-validation): yields `mlflow`, or None when tracking is off."""
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    if not nested:
        use_experiment(mlflow, experiment)
    with _retry(mlflow.start_run, run_name=name, tags=tags | {PROCESS_TAG: this_process()}, nested=nested):
        yield mlflow


@contextmanager
def parent_run(experiment: str, name: str, tags: dict[str, str], key: str) -> Iterator[Any]:
    """The run of `experiment` tagged `key` = tags[key], continued (a resumed search), else a new
    one; yields `mlflow` with it active (None when tracking is off). Its children are other
    processes' runs tagged `mlflow.parentRunId`."""
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    use_experiment(mlflow, experiment)
    found = _retry(mlflow.search_runs, experiment_names=[experiment], filter_string=f"tags.{key} = '{tags[key]}'",
                   output_format="list", max_results=1)
    run_id = found[0].info.run_id if found else None
    with _retry(mlflow.start_run, run_id=run_id, run_name=None if run_id else name,
                tags=tags | {PROCESS_TAG: this_process()}):
        yield mlflow


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


def log_onnx_model(mlflow: Any, path: Path, input_example: Any, output_example: Any, metadata: dict[str, Any],
                   register_as: str | None = None, alias: str = "candidate", providers: list[str] | None = None) -> Any:
    """Log the ONNX file at `path` as the active run's model `model` (MLflow 3 logged model,
    with signature, input example and `metadata` in its MLmodel file). With `register_as`,
    also register it as a new version of that registered model and point `alias` at it.
    `providers`: the ONNX Runtime providers it is loaded with (MLflow's default names CUDA and
    warns on every CPU-only load). Returns MLflow's ModelInfo (`model_uri`,
    `registered_model_version`); None untracked."""
    if mlflow is None:
        return None
    import onnx
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, output_example)
    info = _retry(mlflow.onnx.log_model, onnx.load(str(path)), name="model", signature=signature,
                  onnx_execution_providers=providers,
                  input_example=input_example, metadata=metadata, registered_model_name=register_as,
                  save_as_external_data=path.stat().st_size >= 2**31)  # one file unless over protobuf's 2 GB
    if register_as:
        _retry(mlflow.MlflowClient().set_registered_model_alias, register_as, alias, str(info.registered_model_version))
    return info
