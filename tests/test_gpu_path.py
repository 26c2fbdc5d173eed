"""The data path a GPU needs, checked on the CPU: images resident on the device give the same
batches and the same training as the memory-mapped path; the per-epoch sums kept on the device
equal the host's `loss.item()` sums."""
import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from pipeline.core.params import AugmentParams, TrainParams, parse_params
from pipeline.models import build_model
from pipeline.training.batches import ImageBatches, resident_on, split_batches
from pipeline.training.ema import make_ema
from pipeline.training.loop import (
    TrainConfig,
    _optimization,
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
    batches = split_batches(np.random.default_rng(0).permutation(len(y)), 5)
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


class HostReads(TorchDispatchMode):
    """Records the ops that make a GPU wait for the host: reading a value back (`.item()`,
    `float(t)`: aten._local_scalar_dense), and what needs a count the device must report first
    (nonzero, masked_select, indexing with a boolean mask). On the CPU they run the same ops as on
    a GPU, so counting them here shows where a GPU would wait."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore, self.reads, self.counts = {id(t) for t in ignore}, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and id(args[0]) not in self.ignore:
            self.reads.append(tuple(args[0].shape))
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name in ("nonzero", "masked_select", "nonzero_static") or boolean_index:
            self.counts.append(name)
        return func(*args, **(kwargs or {}))


RICH = AugmentParams(random_crop=True, crop_padding=2, hflip=True, rotate_degrees=10, scale=0.1, color_jitter=0.2,
                     random_erasing=0.5)


@pytest.mark.parametrize("optimizer,resident,resized", [("sgd", True, False), ("adamw", False, True)])
def test_a_training_step_reads_nothing_back_from_the_device(optimizer, resident, resized):
    """However many steps an epoch has, it reads the same few values back (the two sums, once):
    no step waits for the device. With EMA, gradient clipping, label smoothing and every
    augmentation on, on both data paths. (Adam's step counters are CPU tensors by PyTorch's design,
    read without a device sync: they are left out.)"""
    x, y = dark_and_bright()
    counts = []
    for steps in (2, 6):
        seed_everything(0)
        model = build_model("original", num_classes=2, width=8)
        tp = TrainParams(num_threads=1, optimizer=optimizer, ema_decay=0.9, grad_clip=1.0, label_smoothing=0.1)
        cfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, seed=0, augment=RICH, train=tp)
        data = ImageBatches((x, y), (x, y), plain(x), RICH, resized, "cpu", resident=resident)
        optim = _optimization(model, cfg, torch.device("cpu"), steps)
        ema = make_ema(model, 0.9)
        ema.update_parameters(model)  # after a load, the first update reads the count once
        batches = split_batches(np.arange(4 * steps), 4)
        train_one_epoch(model, model, data, torch.from_numpy(y), batches, optim, torch.Generator().manual_seed(1),
                        tqdm(disable=True), ema)  # the optimizer's state exists now: its counters can be told apart
        steps_t = [s["step"] for s in optim.opt.state.values() if "step" in s]
        with HostReads(ignore=steps_t) as mode:
            train_one_epoch(model, model, data, torch.from_numpy(y), batches, optim, torch.Generator().manual_seed(1),
                            tqdm(disable=True), ema)
        assert mode.counts == [], mode.counts
        counts.append(len(mode.reads))
    assert counts[0] == counts[1] == 2, counts


# What the GPU machine lacks (the device tool's package list): gpu_check must not import them.
NOT_ON_THE_GPU_MACHINE = ("dvc", "mlflow", "cleanlab", "optuna", "termcolor")
BLOCKED_RUN = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def jpeg_tarball(tmp_path, classes=("cat", "dog", "ship"), per_class=(60, 6)):
    """A miniature of the shared cifar10-jpeg.tar.gz: train/<class>/NNNN.jpg and test/<class>/..."""
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "jpegs"
    for split, n in zip(("train", "test"), per_class):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 70 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:04d}.jpg", quality=90)
    with tarfile.open(tmp_path / "mini.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    return tmp_path / "mini.tar.gz"


@pytest.mark.slow
def test_gpu_check_smoke_prints_its_json(tmp_path):
    """`--smoke --device cpu` on a miniature of the shared JPEG tarball, with DVC, MLflow and the
    other packages the GPU machine lacks made unimportable: the JSON has every section."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, clean_env

    tarball = jpeg_tarball(tmp_path)
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN.format(blocked=set(NOT_ON_THE_GPU_MACHINE)), "--smoke",
                           "--device", "cpu", "--jpegs", str(tarball), "--out", str(tmp_path / "out.json")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out.json").read_text()) == out
    assert out["device"] == "cpu" and out["smoke"] is True
    assert [r["model"] for r in out["throughput"]] == ["resnet18", "resnet18"]
    for row in out["throughput"]:
        # the ratio of the unrounded speeds; each speed is printed to 0.1 img/s (a slow machine: 2.4 of 2.37)
        slack = 0.05 / row["bare_img_s"] + 0.05 * row["loop_img_s"] / row["bare_img_s"] ** 2 + 0.0005
        assert row["bare_img_s"] > 0 and row["loop_img_s"] > 0 and row["ratio"] == pytest.approx(
            row["loop_img_s"] / row["bare_img_s"], abs=slack)
    assert "skipped" in out["precision_compile"] and "skipped" in out["host_syncs"]
    t94 = out["time_to_94"]
    assert t94["model"] == "resnet9" and t94["train_s"] > 0 and 0 <= t94["test_accuracy"] <= 1
    assert (t94["n_train"], t94["n_val"], t94["n_test"]) == (176, 4, 18)  # the JPEGs, prepared: 2 % to val
    assert t94["whole_s"] >= t94["prepare_s"] + t94["train_s"] > t94["prepare_s"] > 0


def test_the_documented_recipe_is_the_checks_recipe_and_valid(tmp_path):
    """One recipe: docs/gpu.md's `dvc exp run` command for resnet9, on params.yaml's defaults, is
    gpu_check's RECIPE (plus the data set and its val fraction), and params.yaml's rules accept it."""
    import re
    import shutil
    import sys

    import yaml

    from pipeline.core.params import load_params, update_params_file
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import RECIPE, RECIPE_DATA

    command = re.search(r"dvc exp run -S model=resnet9.*?```", (ROOT / "docs/gpu.md").read_text(), re.S).group(0)
    given = {k: yaml.safe_load(v) for k, v in re.findall(r"-S ([\w.]+)=(\S+)", command)}
    assert set(given) - set(RECIPE) - set(RECIPE_DATA) == {"dataset"}
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    update_params_file(tmp_path / "params.yaml", given)
    flat = load_params(tmp_path / "params.yaml").flat()  # what the documented command runs with, defaults included
    assert {k: flat[k] for k in RECIPE | RECIPE_DATA} == RECIPE | RECIPE_DATA


@pytest.mark.parametrize("n_batches", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("resident", [False, True])
def test_an_epochs_batches_are_the_batches_one_by_one(tmp_path, n_batches, resident):
    """`epoch` (indices copied once, the host path gathered ahead by a thread) gives, in order,
    what `batch` gives for each set of indices, with the indices on the device beside them."""
    x, y = dark_and_bright()
    data = ImageBatches((memmapped(tmp_path, x), y), (x, y), plain(x), RICH, False, "cpu", resident=resident)
    rng = np.random.default_rng(n_batches)
    batches = [np.sort(rng.choice(len(y), 5, replace=False)) for _ in range(n_batches)]
    got = list(data.epoch(batches, torch.Generator().manual_seed(4)))
    gen = torch.Generator().manual_seed(4)
    assert len(got) == n_batches
    for (xb, at), idx in zip(got, batches):
        assert torch.equal(xb, data.batch(idx, gen)) and at.tolist() == idx.tolist()


def test_the_ema_keeps_averaged_models_state_layout():
    """The sync-free EMA saves and loads the state dict of torch's AveragedModel (resume files of
    either load), and after a load it continues from the loaded count."""
    from torch.optim.swa_utils import AveragedModel

    model = build_model("original", num_classes=2, width=8)
    ema, reference = make_ema(model, 0.9), AveragedModel(model, use_buffers=True)
    assert list(ema.state_dict()) == list(reference.state_dict())
    for _ in range(3):
        ema.update_parameters(model)
    again = make_ema(model, 0.9)
    again.load_state_dict(ema.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    again.update_parameters(model)
    assert int(again.n_averaged) == 4
    for a, b in zip(ema.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_compile_modes_are_validated():
    assert parse_params({"train": {"compile": True, "compile_mode": "reduce-overhead"}},
                        check_models=False).train.compile_mode == "reduce-overhead"
    with pytest.raises(Exception, match="compile_mode"):
        parse_params({"train": {"compile_mode": "fast"}}, check_models=False)


@pytest.mark.slow
def test_a_compiled_run_trains_and_says_what_compiling_cost(capsys):
    """`train.compile` with CUDA graphs asked for (`reduce-overhead`; on a CPU inductor compiles
    without them): it trains, and train prints the first epoch's excess as the compile cost."""
    x, y = dark_and_bright()
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, seed=0,
                      train=TrainParams(num_threads=2, compile=True, compile_mode="reduce-overhead"))
    result = train(model, (x, y), (x, y), plain(x), cfg, progress=True)
    assert result.metrics["best_val_accuracy"] > 0.9
    t = result.timing
    assert t["first_epoch_excess_seconds"] == pytest.approx(t["first_epoch_seconds"] - t["later_epoch_seconds"])
    assert t["first_epoch_excess_seconds"] > 1  # compiling takes seconds
    assert "torch.compile (reduce-overhead) cost about" in capsys.readouterr().out


def test_a_failing_part_of_the_gpu_check_is_reported_and_the_rest_kept(tmp_path):
    """A lent GPU's minutes are few: a part that fails records its error and the JSON so far is
    on disk after every part."""
    import json
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import section

    out, path = {"device": "cpu"}, tmp_path / "out.json"
    section(out, "works", lambda: {"img_s": 1.0}, path)
    section(out, "breaks", lambda: build_model("no_such_model", num_classes=2), path)
    assert out["works"] == {"img_s": 1.0} and list(out["breaks"]) == ["error"]
    assert "no_such_model" in out["breaks"]["error"] and "\n" not in out["breaks"]["error"].strip()
    assert json.loads(path.read_text()) == out
