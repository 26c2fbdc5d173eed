"""Processes: which one holds a record open (an MLflow run, an Optuna trial), whether it is
gone, and a child whose life is tied to its parent's.

A process killed with -9 runs no handler: what it held open stays open (a run RUNNING, a trial
RUNNING) and what it started goes on (torchrun and its workers, a trial's `dvc exp run`).
So records carry their process (`this_process`: host, pid and the pid's start time, which tells
the process from a later one given the same pid) and the next process ends those whose
process is gone (`process_gone`); and children ask the kernel to end them with their parent
(`tie_to_parent`).
"""
from __future__ import annotations

import os
import signal
import socket
import sys

import psutil


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
