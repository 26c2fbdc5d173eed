"""train.precision on a CPU: bf16 autocast only where the CPU has native bf16 and a probe finds
it faster (auto), or on request; deterministic either way; the probe touches nothing."""
import json
import os

import numpy as np
import pytest
import torch

from pipeline.core.params import AugmentParams, TrainParams
from pipeline.models import build_model
from pipeline.training import precision
from pipeline.training.loop import TrainConfig, seed_everything, train
from tests.conftest import plain
from tests.test_train import dark_and_bright

CPU = torch.device("cpu")


def test_native_bf16_is_read_from_the_cpu_flags():
    line = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {}\nbogomips\t: 4000\n"
    assert precision.cpu_bf16_native(line.format("avx512f amx_bf16 amx_tile"))
    assert precision.cpu_bf16_native(line.format("avx512f avx512_bf16"))
    assert not precision.cpu_bf16_native(line.format("avx512f avx512bw"))
    assert not precision.cpu_bf16_native("")


def test_auto_on_this_cpu_and_explicit_choices():
    model = build_model("original", num_classes=2, width=8)
    sample = lambda: torch.rand(8, 3, 16, 16)  # noqa: E731
    dtype, why = precision.resolve("auto", CPU, model, sample)
    if precision.cpu_bf16_native():  # a CPU with AMX / AVX-512 BF16: the probe decided
        assert "probe" in why and dtype in (torch.bfloat16, None)
    else:
        assert dtype is None and "no native bf16" in why
    assert precision.resolve("auto", CPU, model, None)[0] is None or not precision.cpu_bf16_native()
    assert precision.resolve("bf16", CPU, model, sample)[0] == torch.bfloat16
    assert precision.resolve("fp32", CPU, model, sample)[0] is None
    assert precision.resolve("fp16", CPU, model, sample) == (None, "fp32 (fp16 is for GPUs)")


def test_the_probe_leaves_the_model_and_the_random_stream_alone():
    torch.manual_seed(0)
    model = build_model("original", num_classes=2, width=8, drop_rate=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.rand(8, 3, 16, 16)
    state = torch.random.get_rng_state()
    gain = precision.probe_speedup(model, batch, steps=1)
    assert gain > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch-norm statistics included
    assert torch.equal(state, torch.random.get_rng_state())


def fit(prec: str, seed: int = 0):
    x, y = dark_and_bright()
    seed_everything(seed)
    model = build_model("original", num_classes=2, width=8)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=seed, augment=AugmentParams(random_crop=False),
                      train=TrainParams(precision=prec, num_threads=1))
    result = train(model, (x, y), (x, y), plain(x), cfg, progress=False)
    return result


def test_bf16_training_on_a_cpu_is_deterministic_and_is_bf16():
    a, b, full = fit("bf16"), fit("bf16"), fit("fp32")
    assert a.timing["precision"] == "bf16" and full.timing["precision"] == "fp32"
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert not all(torch.equal(a.best_state[k], full.best_state[k]) for k in a.best_state)
    assert np.array_equal(a.history["train_loss"], b.history["train_loss"])
    assert a.metrics["best_val_accuracy"] > 0.9  # dark vs bright: learnt in bf16 too


def test_the_probes_answer_is_remembered_per_machine_model_and_batch(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    model, batch = build_model("original", num_classes=2, width=8), torch.rand(8, 3, 16, 16)
    gain, remembered = precision.remembered_gain(model, batch)
    assert gain > 0 and not remembered
    assert precision.remembered_gain(model, batch) == (gain, True)  # the next run decides as the first
    other = precision.remembered_gain(model, torch.rand(4, 3, 16, 16))  # another batch: probed on its own
    assert not other[1] and len(json.loads(precision.cache_file().read_text())) == 2
    precision.cache_file().write_text("{not json")  # a damaged cache: probed again, and rewritten
    assert not precision.remembered_gain(model, batch)[1] and precision.remembered_gain(model, batch)[1]


def test_auto_says_when_it_decided_as_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    model = build_model("original", num_classes=2, width=8)
    sample = lambda: torch.rand(8, 3, 16, 16)  # noqa: E731
    first, second = (precision.resolve("auto", CPU, model, sample) for _ in range(2))
    if not precision.cpu_bf16_native():  # no probe at all on this CPU: nothing remembered
        assert first == second == (None, precision.NO_NATIVE) and not precision.cache_file().exists()
        return
    assert first[0] == second[0] and "as first measured on this machine" in second[1] and "first" not in first[1]


def test_the_probe_times_what_the_strategy_trains_on_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    model, batch = build_model("original", num_classes=2, width=8), torch.rand(8, 3, 16, 16)
    total = sum(p.numel() for p in model.parameters())

    def only_the_last_layer(m):
        *rest, last = list(m.parameters())
        for p in rest:
            p.requires_grad_(False)
    precision.remembered_gain(model, batch, only_the_last_layer)
    [key] = json.loads(precision.cache_file().read_text())
    last = list(model.parameters())[-1].numel()
    assert f"{total} parameters, {last} trainable" in key
    assert all(p.requires_grad for p in model.parameters())  # the run's model is as it was


PROBE_AT_ONCE = """
import json, os, sys, time
from pathlib import Path
import torch
from pipeline.models import build_model
from pipeline.training import precision
folder, n = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
model = build_model("original", num_classes=2, width=8)
(folder / f"ready-{os.getpid()}").touch()
while not (folder / "go").exists():  # both probe at once
    time.sleep(0.005)
print(json.dumps(precision.remembered_gain(model, torch.rand(n, 3, 16, 16))[1]))
"""


@pytest.mark.parametrize("sizes", [(8, 4), (8, 8)], ids=["two batches", "one batch"])
def test_runs_probing_at_once_keep_every_answer_and_one_probe_per_key(tmp_path, sizes):
    """Two processes (`dvc queue start -j 2`) probe at the same moment: each key is kept (no write
    lost to the other's), and a key is probed once: the run that waited takes the other's answer."""
    import subprocess
    import sys
    import time

    env = os.environ | {precision.CACHE_ENV: str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE_AT_ONCE, str(tmp_path), str(n)], env=env,
                              stdout=subprocess.PIPE, text=True) for n in sizes]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    remembered = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    kept = json.loads((tmp_path / "cache" / "precision_probe.json").read_text())
    assert len(kept) == len(set(sizes))
    assert sorted(remembered) == ([False, False] if sizes[0] != sizes[1] else [False, True])
