"""Processes: which one holds a record open (an MLflow run, an Optuna trial), whether it is
gone, a child whose life is tied to its parent's, and two pieces of work side by side.

A process killed with -9 runs no handler: what it held open stays open (a run RUNNING, a trial
RUNNING) and what it started goes on (torchrun and its workers, a trial's `dvc exp run`).
So records carry their process (`this_process`: host, pid and the pid's start time, which tells
the process from a later one given the same pid) and the next process ends those whose
process is gone (`process_gone`); and children ask the kernel to end them with their parent
(`tie_to_parent`).
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import traceback
from typing import Callable, TypeVar

import psutil

T = TypeVar("T")
U = TypeVar("U")


def this_process() -> str:
    """"host pid start-time" of this process."""
    return process_key(os.getpid())


def process_key(pid: int) -> str:
    """"host pid start-time" of the process `pid` (psutil.NoSuchProcess when there is none)."""
    return f"{socket.gethostname()} {pid} {psutil.Process(pid).create_time():.2f}"


def process_gone(owner: str) -> bool:
    """Whether the process `owner` (some process's `this_process()`) has ended: on this host its
    pid is gone, a zombie, or now another process's; another host's cannot be told (False)."""
    try:
        host, pid, started = owner.rsplit(" ", 2)
        if host != socket.gethostname():
            return False
        process = psutil.Process(int(pid))
        return f"{process.create_time():.2f}" != started or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except (ValueError, AttributeError):  # not a value this module wrote
        return False


PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


def tie_to_parent(parent: int | str | None, sig: int = signal.SIGKILL) -> bool:
    """On Linux, this process gets `sig` when its parent dies, even by kill -9. Returns False when
    the parent (pid `parent`, when known) died before that took hold (this process was adopted):
    the caller then ends itself. Elsewhere nothing is tied (True)."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    return parent is None or os.getppid() == int(parent)


def side_by_side(here: Callable[[], T], there: Callable[[], U]) -> tuple[T, U]:
    """`here()` in this process while `there()` runs in a fork of it, each on one thread (torch,
    OpenMP, BLAS): on two cores the pair takes the longer one's time, not the sum. For work that
    is mostly single-threaded Python (matplotlib drawing pictures), which more threads would not
    speed up. `there()`'s result or exception comes back pickled (a UserError stays one); the fork
    dies with this process (Ctrl-C, SIGTERM, kill -9). With one core, or off Linux: one after
    the other, with every thread."""
    if not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2:
        return here(), there()
    import torch
    from threadpoolctl import threadpool_limits

    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    parent, pid = os.getpid(), os.fork()
    if pid == 0:
        os.close(read)
        _run_forked(there, write, parent)
    os.close(write)
    threads = torch.get_num_threads()
    try:
        with threadpool_limits(1):
            torch.set_num_threads(1)
            try:
                mine = here()
            finally:
                torch.set_num_threads(threads)
        with os.fdopen(read, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:  # here() failed or was interrupted: the fork's work is not wanted
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if not payload:
        raise RuntimeError(f"the forked process died ({_status_text(status)}) before it finished")
    kind, value, where = pickle.loads(payload)
    if kind == "error":
        value.add_note(f"in the forked process:\n{where}")
        raise value
    return mine, value


def _run_forked(work: Callable[[], object], fd: int, parent: int) -> None:
    """The fork's side of `side_by_side`: run `work` on one thread, send back what it gave or
    raised, and exit without running the parent's exit handlers."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C, SIGTERM: the parent says so; this ends quietly
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if not tie_to_parent(parent):
            os._exit(1)
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        with threadpool_limits(1):
            out = ("ok", work(), "")
        payload = pickle.dumps(out)
    except BaseException as exc:  # noqa: BLE001 (it goes to the parent, which raises it)
        where = traceback.format_exc()
        try:
            payload = pickle.dumps(("error", exc, where))
        except Exception:  # noqa: BLE001 (an exception that does not pickle: its type and text)
            payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), where))
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(payload)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
