"""User-facing errors: one line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

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
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  (the last line of defence: no traceback reaches the user)
        if isinstance(exc, BrokenPipeError) and _stdout_gone():  # `pipeline models | head`: the reader left
            sys.exit(EXIT_BUG)
        if os.environ.get(TRACEBACK_ENV):
            raise
        where = f" in stage {os.environ['DVC_STAGE']}" if os.environ.get("DVC_STAGE") else ""
        print(f"error{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(unexpected: re-run with {TRACEBACK_ENV}=1 to see where, and report it)", file=sys.stderr)
        sys.exit(EXIT_BUG)


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
