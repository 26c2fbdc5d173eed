"""Fine-tuning ImageNet weights at 224 px on a CPU: is the training loop as fast as the compute?

For tf_efficientnet_lite0 on its real ImageNet weights, per strategy (full fine-tuning with the
pretrained batch-norm statistics frozen, and partial: the last stage + head) and precision (fp32,
bf16 autocast): images/s of the real training loop (pipeline.training.run: memory-mapped uint8
images stored at 256 px, random-resized crop to 224, flips, forward, backward, step, metrics),
the best of REPEATS epochs after the first, ÷ images/s of a bare forward+backward+step of the
same model with the same parameters trainable, on a tensor already in memory, the best of REPEATS
bursts of an epoch's steps; same batch, threads, process.
Target: ≥ 0.95. bf16 is measured where the CPU has native bf16 (AMX, AVX-512 BF16); elsewhere it
is emulated, slower than fp32, and shown as such.

Needs the CIFAR-10 JPEG archive and the weights (bench_transfer's --archive / --weights).
Run: python benchmarks/bench_finetune_cpu.py [--images 192] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_transfer as bt  # noqa: E402

CONFIGS = [("full", "fp32"), ("partial", "fp32"), ("full", "bf16"), ("partial", "bf16")]
REPEATS = 3  # loop epochs after the first, and bare bursts of as many steps: the best of each (a shared
             # 2-core machine moved single measurements by up to 15 %)


def measure(project: Path, finetune: str, prec: str, batch_size: int) -> dict:
    """The real loop's images/s (its second epoch) and the bare step's, in this process."""
    import torch
    import torch.nn.functional as F

    from pipeline.core.params import parse_params, read_yaml
    from pipeline.training.loop import optimizer_for, set_epoch_mode
    from pipeline.training.run import fit_arrays, setup

    os.chdir(project)
    raw = read_yaml((project / "params.yaml").read_text())
    raw["finetune"], raw["epochs"], raw["batch_size"] = finetune, 1 + REPEATS, batch_size
    raw["train"] = dict(raw.get("train") or {}, precision=prec)
    params = parse_params(raw)
    s = setup(params, "cpu")
    s = dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, resume_path=None))  # no checkpoint per epoch
    from pipeline.prepared import load_split

    train_xy, val_xy = load_split("train"), load_split("val")
    val_xy = (val_xy[0][:2], val_xy[1][:2])  # the epoch's figure is the batch loop; validation kept tiny
    result = fit_arrays(s, train_xy, val_xy, progress=False)
    loop_ips = float(result.history["images_per_second"].iloc[1:].max())  # the best epoch after the first

    b = setup(params, "cpu")  # the same model, built again: the same trainable parameters as epoch 2
    set_epoch_mode(b.model, b.cfg, 2, announce=False)
    model = b.model.to(memory_format=torch.channels_last)
    opt = optimizer_for(model, b.cfg, b.cfg.lr)
    xb = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, len(b.classes), (batch_size,))
    dtype = torch.bfloat16 if result.timing["precision"] == "bf16" else None

    def bare(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * batch_size / (time.perf_counter() - t0)
    bare(1)  # warm-up
    steps = max(2, len(train_xy[1]) // batch_size)
    bare_ips = max(bare(steps) for _ in range(REPEATS))  # the best burst, as the loop's best epoch
    return {"finetune": finetune, "precision": result.timing["precision"], "loop_images_per_s": round(loop_ips, 2),
            "bare_images_per_s": round(bare_ips, 2), "ratio": round(loop_ips / bare_ips, 3),
            "threads": torch.get_num_threads()}


def run_json(cmd: list[str]) -> dict:
    """A child process's last line, as JSON."""
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, env=bt.env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bt.input_args(ap)
    ap.add_argument("--images", type=int, default=192, help="training images (two CIFAR-10 classes, upscaled)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--config", help=argparse.SUPPRESS)  # internal: one measurement in a child process
    ap.add_argument("--project", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        finetune, prec = args.config.split(",")
        print(json.dumps(measure(args.project, finetune, prec, args.batch_size)))
        return
    if not bt.use_inputs(args):
        return
    from pipeline.training.precision import cpu_bf16_native, cpu_name

    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp_name:
        tmp = Path(tmp_name)
        per_class = args.images // 2
        images = bt.subset(bt.unpack(Path(os.environ.get("CIFAR_DIR", tmp / "cifar10"))), tmp / "images", per_class + per_class // 5, 8,
                           classes=["cat", "dog"])
        project = bt.make_project(tmp / "project")
        bt.set_params(project, {"dataset": "folder", "data_dir": str(images), "model": bt.MODEL,
                                "weights": str(bt.WEIGHTS), "augment.hflip": True, "data.val_fraction": 0.15})
        bt.stages(project, ["check", "download", "prepare"])
        rows = []
        for finetune, prec in CONFIGS:  # each in its own process: no allocator or thread state carried over
            out = run_json([sys.executable, __file__, "--config", f"{finetune},{prec}", "--project", str(project),
                            "--batch-size", str(args.batch_size)])
            rows.append(out | {"bf16": "native" if cpu_bf16_native() else "emulated"} if prec == "bf16" else out)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{cpu_name()}, batch {args.batch_size}, 224 px, tf_efficientnet_lite0 (real ImageNet weights)")
    print("| strategy | precision | loop img/s | bare step img/s | loop ÷ bare |\n|---|---|---|---|---|")
    for r in rows:
        label = r["precision"] + (f" ({r['bf16']})" if "bf16" in r else "")
        print(f"| {r['finetune']} | {label} | {r['loop_images_per_s']:.1f} | {r['bare_images_per_s']:.1f} | "
              f"{r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
