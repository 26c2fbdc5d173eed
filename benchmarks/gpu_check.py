"""The GPU path in one command: prints one JSON object.

1. `throughput`: for resnet18 at 32 px, resnet50 and efficientnet_b0 at 224 px, the bare
   forward+backward+step throughput on one device-resident float batch against our real training
   loop (`pipeline.training.loop.train`: uint8 images, per-sample augmentation, on-device sums) on
   the same model, batch and precision; `ratio` = loop / bare (target ≥ 0.9 on a GPU).
2. `precision_compile`: resnet18 at 32 px through the real loop in fp32, bf16 and bf16 +
   torch.compile (its first epoch, compile included, timed apart from the second).
3. `time_to_94`: the fast CIFAR net (`resnet9`) with the fast recipe (RECIPE, RECIPE_DATA) on
   CIFAR-10: `--jpegs` the CIFAR-10 JPEG archive cifar10-jpeg.tar.gz (prepared here as the prepare stage does,
   its time counted) or `--cifar` an already prepared folder; trained on the train split, the
   best epoch picked on val, scored on test: seconds to prepare, to train and in all (prepare,
   load, train, test), each epoch's val accuracy, the test accuracy, whether it reached 94 %.
4. `host_syncs`: synchronizing CUDA calls per training step (CUDA's sync debug mode; target 0).

It needs torch, timm, numpy, pandas, Pillow and this package's library (pipeline/; pydantic for
its params types: `bash benchmarks/gpu_bundle.sh` fetches the wheels for a machine without it),
not DVC or MLflow.
On a GPU: python benchmarks/gpu_check.py --jpegs cifar10-jpeg.tar.gz (at most ~8 minutes on one H200).
On a CPU: python benchmarks/gpu_check.py --smoke --device cpu (tiny settings, seconds: what the
test suite runs; its figures say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.params import AugmentParams, TrainParams  # noqa: E402
from pipeline.core.preprocess import Preprocessing  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training.loop import TrainConfig, train  # noqa: E402

# (model, image size, batch) measured on a GPU; --smoke shrinks them
MODELS = [("resnet18", 32, 512), ("resnet50", 224, 128), ("efficientnet_b0", 224, 128)]
# The fast recipe (params.yaml keys, `dvc exp run -S key=value`): Page's ResNet-9 schedule (linear
# warm-up to 0.4 over 5 epochs, then down to 0 at 24; our closest shape is cosine with warm-up), label
# smoothing 0.2 (airbench), random erasing for his 8×8 cutout (the same expected area)
RECIPE = {"model": "resnet9", "epochs": 24, "batch_size": 512, "lr": 0.4, "train.optimizer": "sgd",
          "train.momentum": 0.9, "train.nesterov": True, "train.weight_decay": 5e-4, "train.scheduler": "cosine",
          "train.warmup_epochs": 5, "train.label_smoothing": 0.2, "augment.crop_padding": 4, "augment.hflip": True,
          "augment.random_erasing": 0.35}
RECIPE_DATA = {"data.val_fraction": 0.02}  # the recipe's split: 49,000 images to train on, 1,000 to pick the epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(model: torch.nn.Module, size: int, batch: int, steps: int, device: torch.device, dtype) -> float:
    """Images/s of forward+backward+SGD step on one normalised batch already on the device."""
    model.to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(2, steps // 5)):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def loop(name: str, size: int, batch: int, steps: int, device: torch.device, precision: str,
         compile_: bool = False, epochs: int = 2, kwargs: dict | None = None, augment: AugmentParams | None = None,
         ema_decay: float = 0.0) -> list[float]:
    """Images/s of each epoch of the real training loop on random uint8 images of `steps` batches
    (the first epoch includes warm-up and compilation)."""
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    prep = Preprocessing(size, size, mean=(0.5,) * 3, std=(0.25,) * 3)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=0.01, seed=0, device=str(device),
                      augment=augment or AugmentParams(random_crop=True, crop_padding=4, hflip=True),
                      train=TrainParams(optimizer="sgd", precision=precision, compile=compile_, ema_decay=ema_decay))
    model = build_model(name, num_classes=10, **(kwargs or {}))
    result = train(model, (x, y), (x[:batch], y[:batch]), prep, cfg, progress=False)
    return [float(v) for v in result.history["images_per_second"]]


def throughput(models, steps: int, device: torch.device, precision: str) -> list[dict]:
    dtype = torch.bfloat16 if precision == "bf16" else None
    rows = []
    for name, size, batch in models:
        b = bare(build_model(name, num_classes=10), size, batch, steps, device, dtype)
        ours = loop(name, size, batch, steps, device, precision)[-1]  # the second epoch: warmed up
        rows.append({"model": name, "image_size": size, "batch": batch, "bare_img_s": round(b, 1),
                     "loop_img_s": round(ours, 1), "ratio": round(ours / b, 3)})
    return rows


def precision_compile(size: int, batch: int, steps: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "bf16 autocast and torch.compile are measured on a GPU only"}
    out = {}
    for label, precision, compile_ in (("fp32", "fp32", False), ("bf16", "bf16", False),
                                       ("bf16_compile", "bf16", True)):
        first, second = loop("resnet18", size, batch, steps, device, precision, compile_)
        out[label] = {"first_epoch_img_s": round(first, 1), "img_s": round(second, 1)}
    return out


def cifar_from_jpegs(jpegs: Path, work: Path) -> tuple[Path, float]:
    """The CIFAR-10 JPEGs (`cifar10-jpeg.tar.gz`, or the folder it unpacks to: train/ and
    test/ of class folders) prepared as the pipeline's prepare stage does (decoded once to uint8
    at 32 px, 2 % of train held out for val): (prepared folder, seconds it took, unpacking included)."""
    import tarfile

    from pipeline.data.folder import scan_folder
    from pipeline.data.prepare import prepare
    from pipeline.core.params import DataParams

    t0 = time.perf_counter()
    root = jpegs
    if jpegs.is_file():
        with tarfile.open(jpegs) as tar:
            tar.extractall(work / "jpegs", filter="data")
        tops = [p for p in (work / "jpegs").iterdir() if p.is_dir()]
        root = tops[0] if len(tops) == 1 and not (work / "jpegs" / "train").is_dir() else work / "jpegs"
    # the set's own test split is kept: test_fraction is not used
    prepare(scan_folder(root), 32, DataParams(val_fraction=RECIPE_DATA["data.val_fraction"]), out_dir=work / "prepared")
    return work / "prepared", time.perf_counter() - t0


def time_to_94(cifar: Path | None, device: torch.device, smoke: bool, prepare_s: float = 0.0) -> dict:
    """The fast recipe on a prepared CIFAR-10 (train, val, test as prepared); with --smoke,
    a tiny ResNet-9 for one epoch (on random images without --cifar/--jpegs): it checks the path,
    not the figure. `whole_s` counts preparing (`prepare_s`), loading, training and testing."""
    from pipeline.checkpoint import predict_logits

    t0 = time.perf_counter()
    r = RECIPE
    aug = AugmentParams(random_crop=True, crop_padding=r["augment.crop_padding"], hflip=r["augment.hflip"],
                        random_erasing=r["augment.random_erasing"])
    tp = TrainParams(optimizer="sgd", momentum=r["train.momentum"], nesterov=r["train.nesterov"],
                     weight_decay=r["train.weight_decay"], scheduler=r["train.scheduler"],
                     warmup_epochs=r["train.warmup_epochs"], label_smoothing=r["train.label_smoothing"])
    if cifar is not None:
        from pipeline.prepared import load_preprocessing, load_split

        (x_tr, y_tr), val, (x_te, y_te) = (load_split(s, cifar) for s in ("train", "val", "test"))
        prep = load_preprocessing(cifar)
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (256, 3, 16, 16), dtype=np.uint8), rng.integers(0, 10, 256).astype(np.int64)
        (x_tr, y_tr), val, (x_te, y_te) = (x, y), (x[:64], y[:64]), (x[:64], y[:64])
        prep = Preprocessing(16, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    classes = int(max(y_tr.max(), y_te.max())) + 1
    if smoke:
        model, epochs, batch = build_model("resnet9", num_classes=classes, width=0.125), 1, 64
    else:
        model, epochs, batch = build_model("resnet9", num_classes=classes), r["epochs"], r["batch_size"]
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=r["lr"], seed=0, device=str(device), augment=aug, train=tp)
    loaded = time.perf_counter()
    result = train(model, (x_tr, y_tr), val, prep, cfg, progress=False)
    trained = time.perf_counter()
    model.load_state_dict(result.best_state)
    accuracy = float((predict_logits(model, x_te, prep).argmax(1) == y_te).mean())
    return {"model": "resnet9", "recipe": RECIPE | RECIPE_DATA if not smoke else "smoke: width 0.125, 1 epoch",
            "prepare_s": round(prepare_s, 2), "train_s": round(trained - loaded, 2),
            "whole_s": round(prepare_s + time.perf_counter() - t0, 2), "test_accuracy": accuracy,
            "reached_94": accuracy >= 0.94, "best_epoch": result.best_epoch,
            "val_accuracy": [round(float(v), 4) for v in result.history["val_accuracy"]],
            "n_train": len(y_tr), "n_val": len(val[1]), "n_test": len(y_te)}


def syncs_per_step(device: torch.device, precision: str, smoke: bool) -> dict:
    """How often a training step makes the host wait for the GPU: CUDA's sync debug mode warns at
    every synchronizing call; the loop is run for 4 and for 8 steps and the difference divided
    by 4 (validation and the epoch's reads are the same in both). Target: 0."""
    if device.type != "cuda":
        return {"skipped": "counted with CUDA's sync debug mode: on a GPU only"}
    import warnings

    counts = []
    for steps in (4, 8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop("resnet18", 32, 8 if smoke else 256, steps, device, precision, epochs=1,
                     augment=AugmentParams(random_crop=True, crop_padding=4, hflip=True, random_erasing=0.35),
                     ema_decay=0.999)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return {"syncs_4_steps": counts[0], "syncs_8_steps": counts[1], "per_step": (counts[1] - counts[0]) / 4}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (the test suite runs them on a CPU)")
    ap.add_argument("--cifar", type=Path, default=None, help="a prepared CIFAR-10 folder (data/prepared)")
    ap.add_argument("--jpegs", type=Path, default=None,
                    help="the CIFAR-10 JPEG archive cifar10-jpeg.tar.gz (or its unpacked folder): prepared here, its time counted")
    ap.add_argument("--steps", type=int, default=30, help="timed batches per throughput figure")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    models = [("resnet18", 16, 16), ("resnet18", 32, 8)] if args.smoke else MODELS
    steps = 3 if args.smoke else args.steps
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "precision": precision, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as work:
        cifar, prepare_s = args.cifar, 0.0
        if args.jpegs:  # first, before CUDA starts: prepare forks its decoding workers
            cifar, prepare_s = cifar_from_jpegs(args.jpegs, Path(work))
        if cifar or args.smoke:
            section(out, "time_to_94", lambda: time_to_94(cifar, device, args.smoke, prepare_s), args.out)
        else:
            out["time_to_94"] = {"skipped": "give --jpegs cifar10-jpeg.tar.gz or --cifar data/prepared"}
    section(out, "throughput", lambda: throughput(models, steps, device, precision), args.out)
    section(out, "host_syncs", lambda: syncs_per_step(device, precision, args.smoke), args.out)
    section(out, "precision_compile", lambda: precision_compile(32, 8 if args.smoke else 512, steps, device),
            args.out)
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    text = json.dumps(out)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return out


def section(out: dict, key: str, measure, path: Path | None) -> None:
    """One part of the check: its figures, or its error in one line, so that the others still
    run (GPU time is often short: one failure must not cost the whole run). The JSON so far
    is written to `path` after each part, so a run cut short by its time limit keeps what it had."""
    t0 = time.perf_counter()
    try:
        out[key] = measure()
    except Exception as exc:  # noqa: BLE001 - any failure of one part is reported, not raised
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    print(f"gpu_check: {key} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if path:
        path.write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
