"""Warm stages: under one `dvc repro` (or `dvc exp run`), the libraries the model stages import
(torch, torchvision, timm, MLflow, matplotlib, scikit-learn, ONNX) are imported once, not once
per stage.

Each DVC stage is its own Python process, and a stage that touches a model spends its first
seconds importing them: 4.4 s of train's start-up on 2 cores, 3.6 s of evaluate's, 2.5 s of
export's, 1.6 s of report's, 1.1 s of prepare's. So the first such stage (check) starts a server
that imports them once, and every stage but download (which imports little) runs in a fork of it.
The server imports in groups and forks a stage as soon as what it needs is in: check once torch
and timm are (it would have imported them itself), prepare once pandas and matplotlib are, while
the rest (MLflow, scikit-learn, ONNX) comes in beside them; train and the later stages find all.
- The stage runs in a fresh fork, with the stage process's arguments, working directory,
  environment and stdin/stdout/stderr, in a process group of its own. Our own code (`pipeline`,
  `stages`) is never imported by the server: each fork imports this checkout's code, as a cold
  start does, so DVC's dependencies stay what runs.
- The stage process that DVC started (the client) waits, passes on the signals it gets
  (Ctrl-C, SIGTERM) to the fork's group, and exits with the fork's status. If the client dies
  (kill -9), the fork gets SIGTERM, then SIGKILL.
- The server belongs to one DVC process: it ends when that one has ended and its last fork has
  (no process is left behind), or after 10 idle minutes. It is found under a name made of the
  DVC process, the checkout, the interpreter and the environment, in Linux's abstract socket
  namespace (nothing on disk), and serves only its own user.
- Off with PIPELINE_WARM=0; never under torchrun, outside DVC or off Linux. A stage that finds no
  server (or one that cannot serve) starts cold, as without it.
The outputs are the same bytes either way (tests/test_warm.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time

OFF_ENV = "PIPELINE_WARM"  # 0: every stage starts its own interpreter
FORK_ENV = "PIPELINE_WARM_FORK"  # the pid of a stage that runs in a fork of the server (`forked()`)
# What the server imports, in order, each group for the stages named beside it (seconds on 2 cores,
# cold): a stage is forked once its group and those before it are in; the other stages (None) wait for all.
PRELOAD = (
    (("stages.check",), ("torch", "torchvision", "timm", "pydantic", "yaml", "psutil")),  # 3.3 s
    (("stages.prepare",), ("PIL.Image", "PIL.JpegImagePlugin", "matplotlib", "matplotlib.pyplot", "pandas",
                           "scipy.sparse.csgraph", "tqdm")),  # 0.8 s
    (None, ("mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.tracking",  # 1.6 s
            # the map of installed packages MLflow builds when a model is logged (0.7 s of report)
            "mlflow.utils.requirements_utils:_init_modules_to_packages_map",
            "sklearn.metrics", "sklearn.manifold", "sklearn.decomposition", "cleanlab.filter",  # 1.3 s
            "onnx", "torch.onnx", "tabulate")),  # (not onnxruntime: 0.1 s, and its import starts a thread of its own)
)
# The stages that run in a fork (download starts in well under a second: it always starts cold).
STAGES = ("stages.check", "stages.prepare", "stages.train", "stages.evaluate", "stages.export", "stages.report")
FIRST = "stages.check"  # where a server starts: this stage waits for it (it would import the same itself)
STARTER = "stages.download"  # runs cold, but starts the server when it comes first (the imports begin sooner)
IDLE_SECONDS = 600
_SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}


def forked() -> bool:
    """Whether this process is a stage running in a fork of the warm server (metrics/train_timing.json
    says so); not its children (torchrun's workers started cold), which inherit the variable."""
    return os.environ.get(FORK_ENV) == str(os.getpid())


# --- the client: a stage process started by DVC -------------------------------------------------

def delegate() -> None:
    """Run this stage in a fork of the warm server and exit with its status; return (to start
    cold) where that cannot be done. Called first thing by `stages/__init__.py`."""
    module = _stage_module()
    if module is None or not _eligible():
        return
    owner = _dvc_owner()
    if owner is None:
        return
    conn, pid = _handed_over(module, _name(owner), owner)  # (Ctrl-C meanwhile: stages/__init__.py's handler)
    if conn is not None:
        _wait(conn, pid)


def _handed_over(module: str, name: str, owner: str) -> tuple[socket.socket | None, int]:
    """(connection, pid) of the fork that runs the stage; (None, 0) to start cold."""
    conn = _connect(name)
    if module == STARTER:
        if conn is None:
            _spawn(name, owner)
        else:
            conn.close()
        return None, 0
    if conn is None:  # none yet: start one for the stages to come; check waits for its first imports
        _spawn(name, owner)
        if module != FIRST or (conn := _connect(name, within_s=5.0)) is None:
            return None, 0  # another stage starts cold
    request = {"module": module, "argv": sys.orig_argv[3:], "cwd": os.getcwd(), "env": dict(os.environ)}
    try:
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = _receive(conn)  # once the server has imported what the stage needs
    except OSError:
        reply = None
    if reply is None or "pid" not in reply:  # the server could not take it (or died): cold
        conn.close()
        return None, 0
    return conn, reply["pid"]


def _connect(name: str, within_s: float = 0.0) -> socket.socket | None:
    """A connection to the server `name`; None when there is none (after `within_s` of trying:
    a server just started binds its name in ~0.1 s)."""
    deadline = time.monotonic() + within_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(name)
            return conn
        except OSError:
            conn.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)


def _stage_module() -> str | None:
    argv = getattr(sys, "orig_argv", [])
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] in (*STAGES, STARTER):  # plain `python -m stages.NAME`
        return argv[2]
    return None


def _eligible() -> bool:
    env = os.environ
    return (sys.platform.startswith("linux") and env.get(OFF_ENV, "1") != "0" and "DVC_STAGE" in env
            and "TORCHELASTIC_RUN_ID" not in env and "LOCAL_RANK" not in env)


def _dvc_owner() -> str | None:
    """The DVC process that runs this stage (through a shell or not), as `processes.process_key`."""
    import psutil

    from pipeline.core.processes import process_key

    try:
        proc = psutil.Process(os.getppid())
        for _ in range(2):
            argv = proc.cmdline()
            if any(os.path.basename(a) == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
                return process_key(proc.pid)
            if not argv or os.path.basename(argv[0]) not in _SHELLS:
                return None
            proc = proc.parent()
    except (psutil.Error, AttributeError):  # gone, or no parent
        return None
    return None


def _name(owner: str) -> str:
    """The server's address: one per DVC process, checkout, interpreter and environment (what
    the imports could depend on; DVC_STAGE differs from stage to stage)."""
    env = sorted((k, v) for k, v in os.environ.items() if k != "DVC_STAGE")
    key = json.dumps([owner, os.getuid(), os.getcwd(), sys.executable, sys.path[1:], env])
    return "\0pipeline-warm-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _spawn(name: str, owner: str) -> None:
    import subprocess

    subprocess.Popen([sys.executable, "-m", "pipeline.core.warm", name.lstrip("\0"), owner],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)  # its own session: the terminal's Ctrl-C reaches the
    # client, which passes it on to its fork; the server itself ends with the DVC process


def _receive(conn: socket.socket) -> dict | None:
    data = conn.recv(4096)
    return json.loads(data) if data else None


def _wait(conn: socket.socket, pid: int) -> None:
    """Pass on signals to the fork's group until its status comes; exit with it."""
    def forward(sig, _frame):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    reply = _receive(conn)  # (a signal runs `forward`, then the wait goes on)
    if reply is None:
        print("error: the stage's process ended without a status (warm server gone): run it again, "
              f"or with {OFF_ENV}=0", file=sys.stderr)
        os._exit(1)
    code = os.waitstatus_to_exitcode(reply["status"])
    sys.stdout.flush()
    if code < 0:  # ended by a signal: end the same way, so DVC sees what a cold stage would give it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


# --- the server ----------------------------------------------------------------------------------

def serve(name: str, owner: str) -> None:
    """Import PRELOAD group by group, forking each stage that asks once what it needs is in;
    end with the DVC process `owner` (once no stage of it runs), or after IDLE_SECONDS idle."""
    import gc
    import select

    from pipeline.core.processes import process_gone

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind("\0" + name)
    except OSError:  # another stage started one first
        return
    listener.listen(8)  # stages that arrive while the imports run wait in the queue
    listener.setblocking(False)

    def end_if_orphaned(_sig, _frame):  # DVC stopped (a refused param, Ctrl-C) while we import: stop too
        if process_gone(owner):
            os._exit(0)  # (a stage forked meanwhile is ended by its monitor, which outlives this)

    signal.signal(signal.SIGALRM, end_if_orphaned)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)  # (a timer, not a thread: a fork copies one thread only)
    gc.disable()
    forks: set[int] = set()
    waiting: list[tuple] = []  # (connection, request, descriptors) of stages that wait for their imports
    problem = None
    for group, (_, modules) in enumerate(PRELOAD):
        for i, module in enumerate(modules, start=1):  # a stage that asks waits for one import at most
            problem = problem or _preload([module])
            waiting = _start(_accepted(listener, waiting), group + (i == len(modules)), problem, forks, listener)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    gc.freeze()
    gc.enable()
    last = time.monotonic()
    while True:
        ready, _, _ = select.select([listener], [], [], 0.5)
        forks -= _reaped(forks)
        if forks:
            last = time.monotonic()
        if process_gone(owner):
            problem = "the DVC process has ended"
            if not forks:
                return
        if not forks and time.monotonic() - last > IDLE_SECONDS:
            return
        if ready:
            _start(_accepted(listener, []), len(PRELOAD), problem, forks, listener)


def _accepted(listener: socket.socket, waiting: list[tuple]) -> list[tuple]:
    """`waiting` and the stages that have connected since, with their requests (from this user only)."""
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return waiting
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():  # another user: not even read
            conn.close()
            continue
        try:
            conn.settimeout(5.0)  # (a client sends its request as soon as it is connected)
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(data)
            conn.settimeout(None)
        except (OSError, ValueError):
            conn.close()
            continue
        waiting.append((conn, request, fds))


def _group(module: str) -> int:
    """How many of PRELOAD's groups the stage `module` waits for."""
    return next((i for i, (stages, _) in enumerate(PRELOAD, start=1) if stages and module in stages), len(PRELOAD))


def _start(waiting: list[tuple], loaded: int, problem: str | None, forks: set[int], listener: socket.socket
           ) -> list[tuple]:
    """Fork the stages of `waiting` whose imports are in (`loaded` groups of PRELOAD), or send them
    away to start cold when this process cannot be forked safely (`problem`); the others, still waiting."""
    later = []
    for conn, request, fds in waiting:
        if not problem and _group(request.get("module", "")) > loaded:
            later.append((conn, request, fds))
            continue
        if not problem:
            pid = os.fork()
            if pid == 0:
                listener.close()
                _monitor(conn, request, fds)  # never returns
            forks.add(pid)
        for fd in fds:
            os.close(fd)
        conn.close()  # (refused: the client starts cold)
    return later


def _preload(modules=None) -> str | None:
    """Import `modules` (all of PRELOAD's by default) and call those named "module:function";
    return what keeps this process from being forked safely, if anything."""
    import importlib

    # CUDA must not start before a fork (the fork could not use it): none of these imports starts it,
    # and a library that asks torch.cuda.is_available() at import gets NVML's answer, which starts nothing.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    for entry in modules if modules is not None else [m for _, group in PRELOAD for m in group]:
        module, _, function = entry.partition(":")  # "module:function": a cache the function fills
        try:
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
        except Exception:  # noqa: BLE001  (not installed, or broken: the stage that needs it says so)
            pass
    # A fork copies only the thread that forks. The libraries' own pools (OpenBLAS, jemalloc: idle
    # after an import) reset themselves around a fork, as in every DataLoader worker; a Python
    # thread would not, and may hold a lock: then no stage runs here.
    import threading

    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        return "CUDA started during the imports"
    if threading.active_count() != 1:
        return f"{threading.active_count()} Python threads after the imports"
    return None


def _reaped(pids: set[int]) -> set[int]:
    done = set()
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                done.add(pid)
        except ChildProcessError:
            done.add(pid)
    return done


def _monitor(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """One stage: fork it, tell the client its pid, wait for it, send its status; end it when the
    client goes away."""
    import select

    try:
        pid = os.fork()
        if pid == 0:
            _run_stage(request, fds, conn)  # never returns
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode())
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn.sendall(json.dumps({"status": status}).encode())
                break
            ready, _, _ = select.select([conn], [], [], 0.05)
            if ready and not conn.recv(16):  # the client is gone (kill -9): so is its stage
                _end(pid)
                break
    finally:
        os._exit(0)


def _end(pid: int) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.05)


def _run_stage(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In the fork: become the stage process a cold start would have been, run it, exit."""
    code = 1
    try:
        os.setpgid(0, 0)
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[FORK_ENV] = str(os.getpid())
        _fresh_stdio()
        _fresh_randomness()
        for module in [m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages")]:
            del sys.modules[module]  # this checkout's code, imported now (the server's is not ours to run)
        sys.path[0] = request["cwd"]
        sys.argv = ["-m", *request["argv"]]
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001  (as the interpreter does with an uncaught exception)
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        _exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _fresh_stdio() -> None:
    """stdin/stdout/stderr on the client's descriptors, buffered as the interpreter would."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = os.environ.get("PYTHONIOENCODING") or None
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding,
                                  line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding, errors="backslashreplace",
                                  line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _fresh_randomness() -> None:
    """Unseeded generators start where a new process's would (the stages seed what they use)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def _exit(code: int) -> None:
    """What the interpreter does on its way out (non-daemon threads joined, exit handlers run,
    streams flushed), then end this fork without returning into the server's code."""
    import atexit
    import threading

    try:
        threading._shutdown()  # noqa: SLF001  (the interpreter's own step; no public name)
        atexit._run_exitfuncs()  # noqa: SLF001
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
