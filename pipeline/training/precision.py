"""What precision a training step runs in: `train.precision` resolved for the device.

GPU: bf16 autocast where the GPU has it, else fp16 with a gradient scaler (auto); fp32 on request.
CPU: fp32, unless the CPU computes bf16 natively (AMX or AVX-512 BF16, read from /proc/cpuinfo's
flags) and a short probe on the run's own model and batch finds bf16 autocast at least
`PROBE_GAIN` times faster (auto), or bf16 is asked for. The probe's answer is remembered per
machine, model and batch (`remembered_gain`): a timing must not decide differently from one run
to the next, or the same inputs would train to different bytes on the same machine. A CPU
without native bf16 runs bf16 by emulation, slower than fp32: auto never picks it there. Validation, evaluation and export run in
fp32 whatever the training step used.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.io import exclusive_lock

PROBE_GAIN = 1.2  # bf16 must be this much faster than fp32 in the probe (ResNet-18 at 64 px on a 2-core Xeon
# with AMX measured 1.24 to 1.37 from one probe to the next: hence the answer is remembered, see remembered_gain)
PROBE_STEPS = 3   # timed forward+backward passes per precision (after one untimed)
NO_NATIVE = "fp32 (this CPU has no native bf16: no AMX or AVX-512 BF16)"  # the usual case: train does not print it


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: the `amx_bf16` or `avx512_bf16` flag."""
    flags = _cpuinfo_field("flags", cpuinfo).split()  # not Linux: none, no probe, fp32
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), "?" where there is none: the machine a timing names."""
    return _cpuinfo_field("model name") or "?"


CACHE_ENV = "PIPELINE_CACHE_DIR"  # where the probe's answers are kept; default ~/.cache/pipeline


def cache_file() -> Path:
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"
    return Path(base) / "precision_probe.json"


def probe_key(model: nn.Module, batch: torch.Tensor) -> str:
    """What the probe's answer depends on: the CPU, torch, its threads, the model (class, parameters,
    trainable ones) and the batch's shape."""
    n, trainable = (sum(p.numel() for p in model.parameters() if p.requires_grad or not only) for only in (False, True))
    return (f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {type(model).__name__} "
            f"{n} parameters, {trainable} trainable | batch {tuple(batch.shape)}")


def remembered_gain(model: nn.Module, batch: torch.Tensor, prepare=None) -> tuple[float, bool]:
    """(the probe's speed-up, whether it was remembered): measured once per `probe_key` on this
    machine and kept in `cache_file()`, so every later run decides as the first did (delete the
    file to probe again). Runs at once (`dvc queue start -j 2`) probe one at a time under a file
    lock: one run's answer is not lost to another's write (the loser would probe again, on a CPU
    the other is using, and could decide otherwise), and no probe is timed beside another. An
    unreadable or unwritable cache just means probing each time. `prepare(copy)`: puts a copy of
    the model in the state it trains in (which parameters train)."""
    model = copy.deepcopy(model).train()  # batch-norm statistics move in the copy only
    if prepare is not None:
        prepare(model)
    path, key = cache_file(), probe_key(model, batch)
    if key in (kept := _kept(path)):
        return kept[key], True
    with contextlib.ExitStack() as lock:
        try:
            lock.enter_context(exclusive_lock(path.with_name(path.name + ".lock")))
        except OSError:
            pass  # a read-only cache: this run probes on its own
        if key in (kept := _kept(path)):  # another run measured it while this one waited
            return kept[key], True
        gain = round(probe_speedup(model, batch, copy_model=False), 3)  # as kept: this run decides as the later ones will
        try:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(kept | {key: gain}, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return gain, False


def _kept(path: Path) -> dict[str, float]:
    """The remembered gains by key; none where the file is missing, unreadable or damaged (then written anew)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in kept.items() if isinstance(v, (int, float))} if isinstance(kept, dict) else {}


def _cpuinfo_field(name: str, cpuinfo: str | None = None) -> str:
    """The first `name : value` of /proc/cpuinfo (or of `cpuinfo`), "" where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                 if line.split(":", 1)[0].strip() == name and ":" in line), "")


def probe_speedup(model: nn.Module, batch: torch.Tensor, steps: int = PROBE_STEPS, copy_model: bool = True) -> float:
    """fp32 time / bf16-autocast time of a forward+backward pass of a copy of `model` on `batch`
    (the best of `steps` each): above 1, bf16 is faster. The model itself is not touched
    (`copy_model=False`: `model` is a copy already, in the mode it trains in)."""
    probe = copy.deepcopy(model).train() if copy_model else model  # batch-norm statistics move in the copy only

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


def resolve(precision: str, device: torch.device, model: nn.Module, sample=None,
            prepare=None) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, a line saying why). `sample()`: a batch of the run's
    images for the CPU probe (None: no probe, e.g. a linear probe's cached features);
    `prepare(copy)`: what the strategy trains, applied to the probe's copy of the model (a partial
    fine-tune's backward pass is not a full one's: on tf_efficientnet_lite0 at 224 px bf16 ran
    1.6× as fast as fp32 for the last stage + head, 0.9× for everything)."""
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
    gain, remembered = remembered_gain(model, sample(), prepare)
    when = f", as first measured on this machine: {cache_file()}" if remembered else ""
    if gain >= PROBE_GAIN:
        return torch.bfloat16, f"bf16 autocast (native bf16; the probe ran it {gain:.2f}× as fast as fp32{when})"
    return None, f"fp32 (native bf16, but the probe ran bf16 only {gain:.2f}× as fast{when})"


def sample_batch(data, batch_size: int, device: torch.device):
    """A callable giving one augmented batch of the run's images, drawn with a generator of its
    own (the run's generators and order are not touched); None for cached features."""
    from pipeline.training.batches import ImageBatches

    if not isinstance(data, ImageBatches):  # a linear probe's cached features: nothing worth bf16
        return None
    n = min(batch_size, len(data.x))
    return lambda: data.batch(np.arange(n), torch.Generator(device).manual_seed(0))
