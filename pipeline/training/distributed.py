"""Devices and processes: which device trains (`pick_device`), several processes (DDP under
torchrun): launching them, their process group, and each rank's share of an epoch. gloo on CPU (this machine runs 2 for real in tests/test_ddp.py),
nccl on GPUs.

No process outlives the train stage (tests/test_kill.py). torchrun's agent runs as
`python -m pipeline.training.distributed` (`run_agent`). On Linux the agent gets SIGKILL
when the stage process dies, even by kill -9, and each worker gets SIGKILL when the agent dies
(prctl's PR_SET_PDEATHSIG): all stop at once, as one process killed mid-epoch would, and the
resume checkpoint stays for the next run. SIGTERM or Ctrl-C of the stage: the stage passes SIGTERM
to the agent (in a session of its own, so a terminal's Ctrl-C reaches it only this way), which
stops its workers; the stage then exits 130."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.core.processes import tie_to_parent


def pick_device(spec: str) -> str:
    """`auto`: cuda when a GPU is visible, else cpu. Asking for cuda without one is an error."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible to torch; use train.device=auto or cpu")
    return spec


LAUNCHER_ENV = "PIPELINE_TRAIN_LAUNCHER"  # pid of the train stage process, for torchrun's agent
AGENT_ENV = "PIPELINE_TORCHRUN_AGENT"     # pid of torchrun's agent, for its workers
STOP_SECONDS = 60     # after SIGTERM, torchrun stops its workers (it gives them 30 s) and exits; else SIGKILL


def cpu_cores() -> int:
    """The cores this process may use: OMP_NUM_THREADS when it is set (a scheduler's or a
    user's share of the machine, as torch itself reads it), else every CPU."""
    share = os.environ.get("OMP_NUM_THREADS", "")
    return int(share) if share.isdigit() and int(share) > 0 else os.cpu_count() or 1


def launch_torchrun(nproc: int) -> None:
    """Re-run the train stage as `nproc` DDP processes on this machine (torchrun --standalone),
    tied to this process (see the module's docstring); exit with torchrun's exit code."""
    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "stages.train"]
    print(f"train: launching torch.distributed.run {' '.join(args)}", flush=True)
    agent = subprocess.Popen([sys.executable, "-m", __name__, *args], start_new_session=True,
                             env=os.environ | {LAUNCHER_ENV: str(os.getpid()),
                                                # the share the workers divide (torchrun would set 1)
                                                "OMP_NUM_THREADS": str(cpu_cores())})
    try:
        code = agent.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`run_cli`): torchrun stops its workers
        _stop(agent)
        raise
    if code < 0:
        print(f"error: torchrun was stopped by {_signal_name(-code)} and its workers with it; "
              "re-run train to resume from the last epoch", file=sys.stderr)
        sys.exit(128 - code)
    sys.exit(code)


def _stop(agent: subprocess.Popen) -> None:
    """SIGTERM to torchrun: it passes it to the workers (which end their MLflow run as after
    Ctrl-C) and exits; SIGKILL after STOP_SECONDS, the workers then die with it."""
    agent.terminate()
    try:
        agent.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def run_agent(args: list[str]) -> None:
    """torchrun's agent (`torch.distributed.run`), started by `launch_torchrun`: dies with the
    stage process; stopped by a signal or a failed worker, it exits without torch's traceback."""
    die_with_parent(os.environ.get(LAUNCHER_ENV))
    os.environ[AGENT_ENV] = str(os.getpid())  # the workers inherit it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(args)
    except SignalException as exc:  # SIGTERM from `launch_torchrun`: the workers have stopped
        sys.exit(128 + exc.sigval)
    except ChildFailedError as exc:
        sys.exit(_failed(exc.failures))


def _failed(failures: dict) -> int:
    """The exit code of a failed worker group: the failed worker's own (it has said why), or 128 +
    the signal that killed it, said in one line. A worker killed by another signal than the
    SIGTERM torchrun stops the others with is the cause (torch's timestamps are in seconds)."""
    killed = [(rank, f) for rank, f in sorted(failures.items()) if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
    rank, failure = killed[0] if killed else min(failures.items(), key=lambda item: item[1].timestamp)
    if failure.exitcode >= 0:
        return failure.exitcode
    print(f"error: DDP worker rank {rank} was killed by {_signal_name(-failure.exitcode)}; torchrun stopped the "
          "others; re-run train to resume from the last epoch", file=sys.stderr)
    return 128 - failure.exitcode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def die_with_torchrun() -> None:
    """In a DDP worker: SIGKILL when torchrun's agent dies (it dies with the stage process). The
    agent starts its workers from its main thread (torch warns otherwise), which lives as long as
    the agent: the signal comes only when the agent goes."""
    die_with_parent(os.environ.get(AGENT_ENV))


def die_with_parent(parent: str | None) -> None:
    """SIGKILL when the parent dies, even by kill -9 (Linux); at once if it already has."""
    if not tie_to_parent(parent, signal.SIGKILL):  # adopted: the parent is gone
        os.kill(os.getpid(), signal.SIGKILL)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


@contextmanager
def process_group(device: str) -> Iterator[tuple[str, int]]:
    """(this process's device, its rank): inside torchrun, with the process group set up for the
    duration; otherwise (device, 0). After it, the worker only exits: SIGTERM (torchrun stopping
    the others when a worker failed) then ends it at once instead of raising KeyboardInterrupt
    (`run_cli`) inside its exit handlers, which would print a traceback."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield device, 0
        return
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device, rank
    finally:
        torch.distributed.destroy_process_group()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless running under torchrun with a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of an epoch's order, as DistributedSampler does: padded (wrapping
    around) to a multiple of the world size, then every world-th index from `rank`."""
    if world == 1:
        return order
    padded = np.resize(order, -(-len(order) // world) * world)
    return padded[rank::world]


if __name__ == "__main__":  # torchrun's agent, as `launch_torchrun` starts it
    run_agent(sys.argv[1:])
