"""The data path a GPU needs, checked on the CPU: images resident on the device give the same
batches and the same training as the memory-mapped path; the per-epoch sums kept on the device
equal the host's `loss.item()` sums."""
import copy

import numpy as np
import pytest
import torch
from tqdm import tqdm

from pipeline.models import build_model
from pipeline.params import AugmentParams, TrainParams, parse_params
from pipeline.training.loop import (
    ImageBatches,
    TrainConfig,
    _batches,
    _optimization,
    resident_on,
    seed_everything,
    train,
    train_one_epoch,
)
from tests.conftest import plain
from tests.test_train import dark_and_bright

AUG = AugmentParams(random_crop=True, crop_padding=1, hflip=True)


def memmapped(tmp_path, x: np.ndarray) -> np.ndarray:
    np.save(tmp_path / "x.npy", x)
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def test_placement_is_validated_and_auto_keeps_the_cpu_on_the_host():
    assert parse_params({"train": {"data_placement": "device"}}, check_models=False).train.data_placement == "device"
    with pytest.raises(Exception, match="data_placement"):
        parse_params({"train": {"data_placement": "gpu"}}, check_models=False)
    cpu = torch.device("cpu")
    assert not resident_on(cpu, 10, "auto") and resident_on(cpu, 10, "device") and not resident_on(cpu, 10, "host")


def test_resident_and_host_paths_give_the_same_batches(tmp_path):
    x, y = dark_and_bright()
    host = ImageBatches((memmapped(tmp_path, x), y), (x, y), plain(x), AUG, False, "cpu")
    resident = ImageBatches((memmapped(tmp_path, x), y), (x, y), plain(x), AUG, False, "cpu", resident=True)
    assert host.resident is None and resident.resident is not None
    for idx in (np.array([0, 3, 7]), np.arange(5, 40, 3)):
        a = host.batch(idx, torch.Generator().manual_seed(1))
        b = resident.batch(idx, torch.Generator().manual_seed(1))
        assert torch.equal(a, b)


def test_resident_and_host_paths_train_alike(tmp_path):
    x, y = dark_and_bright()
    results = []
    for placement in ("host", "device"):
        seed_everything(0)
        model = build_model("original", num_classes=2, width=8)
        cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, seed=0, augment=AUG,
                          train=TrainParams(num_threads=1, data_placement=placement))
        results.append(train(model, (memmapped(tmp_path, x), y), (x, y), plain(x), cfg, progress=False))
    a, b = results
    assert a.history.drop(columns="images_per_second").equals(b.history.drop(columns="images_per_second"))
    for (k, va), vb in zip(a.best_state.items(), b.best_state.values()):
        assert torch.equal(va, vb), k


def test_device_sums_equal_the_host_item_sums():
    """One epoch through `train_one_epoch` (sums on the device, read once) against the same
    epoch stepped by hand with `loss.item()` and a host count after every step."""
    x, y = dark_and_bright()
    cfg = TrainConfig(epochs=1, batch_size=5, lr=0.01, seed=0, augment=AUG, train=TrainParams(num_threads=1))
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    twin = copy.deepcopy(model)
    data = ImageBatches((x, y), (x, y), plain(x), AUG, False, "cpu")
    batches = _batches(np.random.default_rng(0).permutation(len(y)), 5)
    y_t = torch.from_numpy(y)

    optim = _optimization(model, cfg, torch.device("cpu"), len(batches))
    bar = tqdm(total=len(batches), disable=True)
    torch.manual_seed(7)  # dropout draws from the global generator: the same draws for both
    got = train_one_epoch(model, model, data, y_t, batches, optim, torch.Generator().manual_seed(3), bar)

    optim2, gen, loss_sum, correct, seen = _optimization(twin, cfg, torch.device("cpu"), len(batches)), \
        torch.Generator().manual_seed(3), 0.0, 0, 0
    torch.manual_seed(7)
    for idx in batches:
        idx = np.sort(idx)
        loss, logits = optim2.step(twin, twin, data.batch(idx, gen), y_t[idx])
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y_t[idx]).sum())
        seen += len(idx)
    assert got == (loss_sum, correct, seen)  # exactly: the same float64 sums in the same order
    assert seen == len(y)


def test_gpu_check_smoke_prints_its_json():
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, clean_env

    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--device", "cpu"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["smoke"] is True
    assert [r["model"] for r in out["throughput"]] == ["resnet18", "resnet18"]
    for row in out["throughput"]:
        assert row["bare_img_s"] > 0 and row["loop_img_s"] > 0 and row["ratio"] == pytest.approx(
            row["loop_img_s"] / row["bare_img_s"], rel=0.01)
    assert "skipped" in out["precision_compile"]
    t94 = out["time_to_94"]
    assert t94["model"] == "resnet9" and t94["train_s"] > 0 and 0 <= t94["test_accuracy"] <= 1


def test_the_readme_recipe_is_the_checks_recipe_and_valid(tmp_path):
    """One recipe: the README's `dvc exp run` command for resnet9, on params.yaml's defaults, is
    gpu_check's RECIPE (plus the data set and its val fraction), and params.yaml's rules accept it."""
    import re
    import shutil
    import sys

    import yaml

    from pipeline.params import load_params, update_params_file
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import RECIPE

    command = re.search(r"dvc exp run -S model=resnet9.*?```", (ROOT / "README.md").read_text(), re.S).group(0)
    given = {k: yaml.safe_load(v) for k, v in re.findall(r"-S ([\w.]+)=(\S+)", command)}
    assert set(given) - set(RECIPE) == {"dataset", "data.val_fraction"}
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", given)
    flat = load_params(tmp_path / "params.yaml").flat()  # what the README's command runs with, defaults included
    assert {k: flat[k] for k in RECIPE} == RECIPE
