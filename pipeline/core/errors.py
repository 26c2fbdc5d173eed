"""User-facing errors: one line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix (bad params, missing data, a bad file). The message says
    what is wrong and how to fix it, on one line."""


EXIT_USER_ERROR = 2
EXIT_BUG = 1
TRACEBACK_ENV = "PIPELINE_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


def _terminate(signum, frame) -> None:
    # `dvc queue kill`, a CI timeout: unwind like Ctrl-C, so open MLflow runs are ended and
    # temporary files removed, instead of dying mid-write
    raise KeyboardInterrupt


def run_cli(main: Callable[[], object]) -> None:
    """Run a stage's or command's `main()`: a `UserError` is one line and exit code 2; an
    interruption (Ctrl-C, SIGTERM) exit 130; anything unexpected one line naming the error
    and exit 1 (PIPELINE_TRACEBACK=1 shows the traceback)."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (stages/__init__.py's handler until here)
    gc.freeze()  # what the imports made lives until the exit: no collection walks it again
    gc.enable()  # (a stage's imports ran without it: stages/__init__.py)
    if hasattr(signal, "SIGXFSZ"):  # over a file-size limit: an OSError naming the file, not a core dump
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        main()  # (no gc.freeze() here: objects frozen at the exit are never freed, and torch's triton then
        # printed ~30 lines of "nanobind: leaked ..." at every stage's end; collecting them costs ~0.5 s)
    except UserError as err:
        print(f"error: {_redacted(str(err))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  (the last line of defence: no traceback reaches the user)
        if isinstance(exc, BrokenPipeError) and _stdout_gone():  # `pipeline models | head`: the reader left
            sys.exit(EXIT_BUG)
        if os.environ.get(TRACEBACK_ENV):
            raise
        if full := _disk_full(exc):
            print(f"error: {full}; free some space and run again", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        where = f" in stage {os.environ['DVC_STAGE']}" if os.environ.get("DVC_STAGE") else ""
        first = _redacted(str(exc).splitlines()[0]) if str(exc) else ""
        print(f"error{where}: {type(exc).__name__}: {first} "
              f"(unexpected: re-run with {TRACEBACK_ENV}=1 to see where, and report it)", file=sys.stderr)
        sys.exit(EXIT_BUG)
    finally:  # exiting now: a SIGTERM ends the process, not an exit handler with a KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _disk_full(exc: Exception) -> str | None:
    """What a full disk (or a file-size limit) looks like when it is not our own write that met it
    (`pipeline.core.io.atomic_path` says those): an OSError, or SQLite's (an MLflow or Optuna store)."""
    from pipeline.core.io import FULL

    if isinstance(exc, OSError) and exc.errno in FULL:
        return f"cannot write {exc.filename or 'a file'}: {FULL[exc.errno]}"
    text = str(exc)
    if "database or disk is full" in text or "disk I/O error" in text:
        return f"cannot write a database ({type(exc).__name__}: {text.splitlines()[0][:120]}): is the disk full?"
    return None


# where the URLs of the stores (with their credentials, if any) come from: what is printed never shows them
SECRET_URLS = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")


def _redacted(text: str) -> str:
    from pipeline.core.secrets import redact_text

    for env in SECRET_URLS:
        text = redact_text(text, os.environ.get(env))
    if password := os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        text = text.replace(password, "***")
    return text


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it (poll says POLLERR); stdout is then
    pointed at /dev/null, so the interpreter's last flush cannot fail again."""
    import select

    if not hasattr(select, "poll"):  # Windows: report it like any other error
        return False
    fd = sys.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True
