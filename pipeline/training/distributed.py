"""Devices and processes: which device trains (`pick_device`), several processes (DDP under
torchrun): launching them, their process group, and each rank's share of an epoch. gloo on CPU (this machine runs 2 for real in tests/test_ddp.py),
nccl on GPUs."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from pipeline.errors import UserError


def pick_device(spec: str) -> str:
    """`auto`: cuda when a GPU is visible, else cpu. Asking for cuda without one is an error."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible to torch; use train.device=auto or cpu")
    return spec


def launch_torchrun(nproc: int) -> None:
    """Re-run the train stage as `nproc` DDP processes on this machine (torchrun --standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages.train"]
    print(f"train: launching {' '.join(cmd[1:])}", flush=True)
    sys.exit(subprocess.run(cmd).returncode)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


@contextmanager
def process_group(device: str) -> Iterator[tuple[str, int]]:
    """(this process's device, its rank): inside torchrun, with the process group set up for the
    duration; otherwise (device, 0)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
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
