"""The MLflow store: where it is, whether it is usable, and MLflow pointed at it.

The default store is `sqlite:///<repo root>/mlflow.db`, the root taken from `DVC_ROOT` so
that queued/temp experiments (which run in a temporary copy) log into the main store;
`MLFLOW_TRACKING_URI` overrides it. Logging is a side record: a stage's own outputs never
depend on it.

The store is probed once per stage, briefly (`store_problem`: a server asked for one experiment,
with a 5 s timeout; a SQLite file's integrity and write access), before anything is logged;
MLflow's own HTTP retries are capped so that a server lost mid-run fails a call in ~30 s, not
minutes. An unusable store stops the stage in one line, or, with `mlflow.required: false`, the
run goes on untracked (one warning; `usable`).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import exclusive_lock
from pipeline.core.secrets import redact


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


def artifact_root() -> Path:
    """Where a local store keeps artifacts: `<repo root>/mlartifacts` (git-ignored)."""
    return paths.repo_root() / paths.MLFLOW_ARTIFACTS


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


def bound_http_retries() -> None:
    """MLflow's client retries an unreachable server for minutes: bound each call (`_HTTP_LIMITS`)."""
    for key, value in _HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def usable(required: bool, experiment: str) -> bool:
    """Whether this stage logs to MLflow: the store is usable, or it is not and `required`
    (`mlflow.required`) is false, which lets the stage go on without it (said once). Otherwise
    one line. `experiment`: the experiment the stage logs to (`Params.experiment_name`)."""
    bound_http_retries()
    problem = store_problem(experiment=experiment)
    if problem and required:
        raise UserError(f"{problem}; fix it or MLFLOW_TRACKING_URI, or set mlflow.required: false to run "
                        "without tracking")
    if problem:
        print(f"warning: {problem}; mlflow.required is false, so this stage runs without tracking", flush=True)
    return problem is None


def store_problem(uri: str | None = None, experiment: str | None = None) -> str | None:
    """What is wrong with the tracking store, in a few words; None when it is usable. With
    `experiment`, the repository's own store is also checked for having moved with it."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return _server_problem(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        own = not os.environ.get("MLFLOW_TRACKING_URI") and experiment is not None
        return _sqlite_problem(db) or (_moved_store_problem(db, experiment) if own else None)
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


def _moved_store_problem(db: Path, name: str) -> str | None:
    """The repository's own store names, for the experiment `name`, an artifact folder outside
    the repository: MLflow fixes an experiment's artifact location (an absolute path) when it is
    created, so a repository moved or copied with its mlflow.db would write its artifacts into
    the old folder (or fail where that is gone)."""
    import sqlite3
    from urllib.parse import urlparse

    if not db.exists():
        return None
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


def connect():
    """The `mlflow` module pointed at the store (a new SQLite store created first)."""
    import mlflow

    uri = tracking_uri()
    _join_maker()
    _create_sqlite_store_once(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


_maker = None  # the child process `make_store_beside` started, until `connect` has waited for it


def make_store_beside() -> None:
    """Start making a new SQLite store (MLflow's schema migrations: ~1 s of one core) in a child
    process, while this one goes on with other work (train builds its model and draws its samples,
    on one core); `connect` waits for it. Nothing when the store is there, is not a SQLite file, or
    cannot be made here. The child is only a head start: whatever it did not finish (it failed,
    or was killed), `connect` does itself, with its own error message."""
    global _maker
    uri = tracking_uri()
    if _maker is not None or (db := _store_to_make(uri)) is None or _sqlite_problem(db):
        return
    import multiprocessing

    # forked (in the stage's process group, so a Ctrl-C or the warm client's kill reaches it); no
    # torch work has started yet, so no thread pool is copied half-way
    _maker = multiprocessing.get_context("fork").Process(target=_make_quietly, args=(uri,), daemon=True)
    _maker.start()


def _make_quietly(uri: str) -> None:
    try:
        _create_sqlite_store_once(uri)
    except BaseException:  # noqa: BLE001 - `connect` makes it again and says what is wrong
        os._exit(1)


def _join_maker() -> None:
    global _maker
    if _maker is not None:
        _maker.join()
        _maker = None


def _store_to_make(uri: str) -> Path | None:
    """The SQLite file of `uri` where MLflow has yet to make the store (missing or empty); None for
    a store that is there or is no SQLite file."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return None if db.exists() and db.stat().st_size > 0 else db


def _create_sqlite_store_once(uri: str) -> None:
    """Create a new SQLite store under an exclusive file lock. Two queued experiments
    (`dvc queue start -j 2`) that both find no mlflow.db would otherwise run MLflow's schema
    migrations on the same file at once; after creation, SQLite's own locking (and
    `tracking._retry`) is enough."""
    if (db := _store_to_make(uri)) is None:
        return
    from mlflow.tracking import MlflowClient

    with exclusive_lock(db.with_name(db.name + "-init.lock")):  # git-ignored: mlflow.db-*
        if _store_to_make(uri) is None:  # another process made it while this one waited
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
