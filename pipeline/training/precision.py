"""What precision a training step runs in: `train.precision` resolved for the device.

GPU: bf16 autocast where the GPU has it, else fp16 with a gradient scaler (auto); fp32 on request.
CPU: fp32, unless the CPU computes bf16 natively (AMX or AVX-512 BF16, read from /proc/cpuinfo's
flags) and a short probe on the run's own model and batch finds bf16 autocast at least
`PROBE_GAIN` times faster (auto), or bf16 is asked for. A CPU without native bf16 runs bf16 by
emulation, slower than fp32: auto never picks it there. Validation, evaluation and export run in
fp32 whatever the training step used.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

PROBE_GAIN = 1.2  # bf16 must be this much faster than fp32 in the probe: a margin that run-to-run noise does not cross
PROBE_STEPS = 3   # timed forward+backward passes per precision (after one untimed)
NO_NATIVE = "fp32 (this CPU has no native bf16: no AMX or AVX-512 BF16)"  # the usual case: train does not print it


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: the `amx_bf16` or `avx512_bf16` flag."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no probe, fp32
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def probe_speedup(model: nn.Module, batch: torch.Tensor, steps: int = PROBE_STEPS) -> float:
    """fp32 time / bf16-autocast time of a forward+backward pass of a copy of `model` on `batch`
    (the best of `steps` each): above 1, bf16 is faster. The model itself is not touched."""
    probe = copy.deepcopy(model).train()  # batch-norm statistics move in the copy only

    def best(dtype: torch.dtype | None) -> float:
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                out = probe(batch)
            out.float().sum().backward()
            times.append(time.perf_counter() - t0)
            probe.zero_grad(set_to_none=True)
        return min(times[1:])
    with torch.random.fork_rng(devices=[]):  # dropout draws here leave the run's random stream as it was
        return best(None) / best(torch.bfloat16)


def resolve(precision: str, device: torch.device, model: nn.Module, sample=None) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, a line saying why). `sample()`: a batch of the run's
    images for the CPU probe (None: no probe, e.g. a linear probe's cached features)."""
    if device.type == "cuda":
        if precision == "fp32":
            return None, "fp32 (train.precision)"
        if precision == "fp16" or not torch.cuda.is_bf16_supported():
            return torch.float16, "fp16 with a gradient scaler" + (" (no bf16 on this GPU)" if precision != "fp16" else "")
        return torch.bfloat16, "bf16 autocast"
    if precision == "bf16":
        return torch.bfloat16, "bf16 autocast (train.precision" + (")" if cpu_bf16_native() else
                                                                 "; this CPU has no native bf16: slower than fp32)")
    if precision == "fp16":
        return None, "fp32 (fp16 is for GPUs)"
    if precision == "fp32":
        return None, "fp32 (train.precision)"
    if not cpu_bf16_native():
        return None, NO_NATIVE
    if sample is None:
        return None, "fp32 (nothing to probe: the backbone's features are cached)"
    gain = probe_speedup(model, sample())
    if gain >= PROBE_GAIN:
        return torch.bfloat16, f"bf16 autocast (native bf16; the probe ran it {gain:.2f}× as fast as fp32)"
    return None, f"fp32 (native bf16, but the probe ran bf16 only {gain:.2f}× as fast)"


def sample_batch(data, batch_size: int, device: torch.device):
    """A callable giving one augmented batch of the run's images, drawn with a generator of its
    own (the run's generators and order are not touched); None for cached features."""
    from pipeline.training.batches import ImageBatches

    if not isinstance(data, ImageBatches):  # a linear probe's cached features: nothing worth bf16
        return None
    n = min(batch_size, len(data.x))
    return lambda: data.batch(np.arange(n), torch.Generator(device).manual_seed(0))
