"""Data-path benchmark: is the data path as fast as the compute it feeds?

Prints ratios measured in one run on this machine (absolute numbers vary run to run; ratios
taken side by side are what we track):
  1. train-loop efficiency: images/s of the real training loop (memory-mapped uint8 data,
     per-sample augmentation, forward, backward, step, progress/metrics bookkeeping) ÷ images/s
     of bare forward+backward+step on a tensor already in memory; same model, batch, threads.
     Target ≥ 0.95 (resnet18, 32 px, CPU).
  2. against the tutorial way (torchvision ImageFolder + PIL transforms + DataLoader with
     workers) on the same image files, same model: images/s ratio. Target: ours ≥ 1.5× faster.
  Both for resnet18 (compute-bound on a CPU) and our small CNN (where the data path shows).
  3. prepare throughput on the 60,000 real CIFAR-10 JPEGs (scan + decode + resize + split +
     write) ÷ a bare PIL open+decode loop over the same files. Target: within 1.5× (ratio ≥ 0.67).
     Peak memory (max RSS) of prepare and of one training epoch, each in its own process.

Needs the CIFAR-10 JPEG archive (--archive); skips with a message without it.
Run: python benchmarks/bench_data_path.py [--train-images 5000] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_transfer as bt  # noqa: E402  (the data arguments)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- phases (each in its own process)


def phase_bare_decode(images: Path) -> dict:
    from PIL import Image

    files = sorted(p for p in images.rglob("*.jpg"))
    t0 = time.perf_counter()
    for p in files:
        with Image.open(p) as im:
            im.convert("RGB").load()
    return {"files": len(files), "images_per_s": len(files) / (time.perf_counter() - t0)}


def phase_prepare(images: Path, out: Path, single: bool = False) -> dict:
    from pipeline.data import prepare as data
    from pipeline.data.folder import scan_folder
    from pipeline.core.params import DataParams

    if single:
        data._PARALLEL_FROM = 1 << 62  # decode in-process, like the bare loop
    t0 = time.perf_counter()
    source = scan_folder(images)
    scan_seconds = time.perf_counter() - t0
    meta = data.prepare(source, 32, DataParams(val_fraction=0.1, test_fraction=0.15, split_seed=0), out)
    seconds = time.perf_counter() - t0
    n = sum(meta["counts"].values())
    return {"images": n, "seconds": seconds, "scan_seconds": scan_seconds, "images_per_s": n / seconds,
            "decode_processes": data.decode_workers(len(source.items)), "peak_rss_mb": peak_rss_mb()}


def _subset(prepared: Path, n: int):
    import numpy as np

    from pipeline.prepared import load_meta, load_split

    x, y = load_split("train", prepared)
    return x[:n], np.asarray(y[:n]), load_meta(prepared)


def phase_loop(prepared: Path, n: int, batch_size: int, arch: str) -> dict:
    """The real training loop (pipeline.training.loop.train), one epoch, plus a bare loop on the
    same model for the same number of steps, in one process, same threads."""
    import torch
    import torch.nn.functional as F

    from pipeline.models import build_model
    from pipeline.core.params import AugmentParams, TrainParams
    from pipeline.prepared import load_preprocessing
    from pipeline.training.loop import TrainConfig, seed_everything, train

    x, y, meta = _subset(prepared, n)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, seed=0, train=TrainParams(optimizer="sgd"),
                      augment=AugmentParams(random_crop=True, crop_padding=4, hflip=True))

    def bare() -> float:
        seed_everything(0)
        # the compute our loop runs: channels_last, as pipeline.training.loop uses
        model = build_model(arch, num_classes=10).train().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        xb = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        yb = torch.randint(0, 10, (batch_size,))
        steps = len(y) // batch_size
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * batch_size / (time.perf_counter() - t0)

    def real() -> tuple[float, float]:
        seed_everything(0)
        model = build_model(arch, num_classes=10)
        # validation on 2 images only: the epoch figure below is the batch loop alone
        result = train(model, (x, y), (x[:2], y[:2]), load_preprocessing(prepared), cfg, progress=True)
        row = result.history.iloc[0]
        return float(row["images_per_second"]), float(result.timing["train_seconds"])

    bare()  # warm-up (allocator, kernels)
    bare_ips = bare()
    real_ips, real_seconds = real()
    bare_ips = (bare_ips + bare()) / 2  # bracket the real loop to even out drift
    return {"images": len(y), "threads": torch.get_num_threads(), "bare_images_per_s": bare_ips,
            "real_images_per_s": real_ips, "real_epoch_seconds": real_seconds, "peak_rss_mb": peak_rss_mb()}


def phase_tutorial(images: Path, n: int, batch_size: int, workers: int, arch: str) -> dict:
    """torchvision ImageFolder + PIL transforms + DataLoader(workers), one epoch, as the tutorials write it."""
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from pipeline.models import build_model
    from pipeline.training.loop import seed_everything

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    ds = datasets.ImageFolder(str(images), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    seed_everything(0)
    model = build_model(arch, num_classes=len(ds.classes)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    t0 = time.perf_counter()
    seen = 0
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(yb)
    seconds = time.perf_counter() - t0
    return {"images": seen, "epoch_seconds": seconds, "images_per_s": seen / seconds, "workers": workers}


# ---------------------------------------------------------------- driver


def run_phase(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        sys.exit(f"phase {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_subset(train_dir: Path, dest: Path, n: int) -> Path:
    """n training images (equal per class) as symlinks in an ImageFolder layout."""
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    per_class = n // len(classes)
    for c in classes:
        (dest / c).mkdir(parents=True)
        for f in sorted((train_dir / c).iterdir())[:per_class]:
            (dest / c / f.name).symlink_to(f)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--train-images", type=int, default=5000, help="images in the timed training epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the tutorial baseline")
    ap.add_argument("--models", default="resnet18,original", help="models for comparisons 1 and 2")
    bt.input_args(ap, weights=False)
    args = ap.parse_args()
    if args.phase:
        name, *rest = args.phase
        fn = {"bare_decode": lambda: phase_bare_decode(Path(rest[0])),
              "prepare": lambda: phase_prepare(Path(rest[0]), Path(rest[1]), rest[2:] == ["single"]),
              "loop": lambda: phase_loop(Path(rest[0]), int(rest[1]), int(rest[2]), rest[3]),
              "tutorial": lambda: phase_tutorial(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), rest[4])}[name]
        print(json.dumps(fn()))
        return
    if not bt.use_inputs(args):
        return
    models = args.models.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        with tarfile.open(bt.ARCHIVE) as tar:
            tar.extractall(tmp / "cifar10", filter="data")
        images = tmp / "cifar10"
        subset = make_subset(images / "train", tmp / "subset", args.train_images)
        print("3. prepare vs bare PIL decode on all CIFAR-10 JPEGs ...", flush=True)
        results["bare_decode"] = run_phase("bare_decode", str(images))  # also warms the page cache
        results["prepare"] = run_phase("prepare", str(images), str(tmp / "prepared"))
        results["prepare_1proc"] = run_phase("prepare", str(images), str(tmp / "prepared1"), "single")
        for arch in models:
            print(f"1. real train loop vs bare forward/backward/step ({arch}, 32 px) ...", flush=True)
            results[f"loop_{arch}"] = run_phase("loop", str(tmp / "prepared"), str(args.train_images),
                                                str(args.batch_size), arch)
            print(f"2. tutorial ImageFolder + DataLoader epoch ({arch}) ...", flush=True)
            results[f"tutorial_{arch}"] = run_phase("tutorial", str(subset), str(args.train_images),
                                                    str(args.batch_size), str(args.workers), arch)
    print(json.dumps(results, indent=1))
    bare, prep, prep1 = results["bare_decode"], results["prepare"], results["prepare_1proc"]
    print()
    for arch in models:
        loop, tut = results[f"loop_{arch}"], results[f"tutorial_{arch}"]
        eff = loop["real_images_per_s"] / loop["bare_images_per_s"]
        speedup = loop["real_images_per_s"] / tut["images_per_s"]
        print(f"1. train-loop efficiency, {arch:<9} {eff:.3f}  (real {loop['real_images_per_s']:.0f} img/s ÷ bare "
              f"{loop['bare_images_per_s']:.0f} img/s, {loop['threads']} threads, batch {args.batch_size})  target ≥ 0.95")
        print(f"2. speed-up vs tutorial, {arch:<9} {speedup:.2f}×  (ours {loop['real_images_per_s']:.0f} img/s, "
              f"tutorial {tut['images_per_s']:.0f} img/s with {tut['workers']} workers)  target ≥ 1.5×")
    print(f"3. prepare ÷ bare decode        {prep['images_per_s'] / bare['images_per_s']:.2f}  (prepare "
          f"{prep['images_per_s']:.0f} img/s over {prep['images']} images with {prep['decode_processes']} decode "
          f"processes, scan {prep['scan_seconds']:.1f} s; bare PIL {bare['images_per_s']:.0f} img/s, 1 process)  "
          f"target ≥ 0.67")
    print(f"   prepare in 1 process ÷ bare  {prep1['images_per_s'] / bare['images_per_s']:.2f}  "
          f"({prep1['images_per_s']:.0f} img/s)")
    print(f"   peak memory: prepare {prep1['peak_rss_mb']:.0f} MB (1 process; {prep['peak_rss_mb']:.0f} MB in the "
          f"parent of {prep['decode_processes']}), one training epoch "
          + ", ".join(f"{a} {results[f'loop_{a}']['peak_rss_mb']:.0f} MB" for a in models))


if __name__ == "__main__":
    main()
