"""Whole-run wall time against Ultralytics on a CPU: same data and split, same architecture,
epochs, image size and batch; each tool otherwise on its own defaults.

The data: a class-folder subset of the CIFAR-10 JPEGs (--archive; --classes classes, --train /
--val / --test images of each), split once into train/, val/ and test/ folders that both tools
read. The model: torchvision's ResNet-18 from random weights (ours: `model=resnet18`;
Ultralytics: its `yolo11-cls-resnet18` recipe, the same ResNet-18 truncated before its pooling
with the YOLO classification head, built without pretrained weights).

- this project: `dvc exp run` of the whole pipeline (check → report) in a temporary copy of the
  project; its training time is the train stage's epoch loop (metrics/train_timing.json
  `loop_seconds`: the steps, each epoch's validation and resume checkpoint, as Ultralytics'
  `train()` includes its own; `steps_s`: the steps alone); `overhead_s` the rest of the run, and
  `stages_s` each stage's share of it (train's without its loop; "dvc": DVC before the first
  stage); test accuracy from metrics/eval.json; `warm_start`: train ran in a fork of the process
  that imported torch & co. once (pipeline/core/warm.py). --cold runs it a second time with
  PIPELINE_WARM=0 (every stage its own interpreter), to see what that saves.
- Ultralytics: `YOLO(...).train(...)` then `.val(split="test")` in a virtual environment of its
  own (--venv, made by this script: it sees this project's torch and torchvision, so nothing
  is downloaded twice, and pip adds Ultralytics and what else it needs; the project's own
  environment is not touched). Skipped with a line when it cannot be installed.

Prints one JSON line per tool and the ratios (ours ÷ theirs): whole-run wall time, training time,
test accuracy. Run on a quiet machine: python benchmarks/bench_vs_ultralytics.py
[--epochs 10] [--image-size 64] [--batch 64] [--only ours|ultralytics] [--cold] [--set KEY=VALUE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # the project, the benchmarks
import bench_transfer as bt  # the CIFAR archive, project copies and runners

ULTRALYTICS = "ultralytics==8.4.190"  # the version of the measurement
CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
# Ultralytics' yolo11-cls-resnet18.yaml with the backbone's weights set to none: from scratch, as ours
YOLO_RESNET18 = """nc: {nc}
backbone:
  - [-1, 1, TorchVision, [512, resnet18, null, True, 2]]
head:
  - [-1, 1, Classify, [nc]]
"""


def split_once(cifar: Path, out: Path, classes: list[str], n_train: int, n_val: int, n_test: int) -> Path:
    """out/{train,val,test}/<class>/*.jpg: train and val from CIFAR's train split (disjoint,
    first files by name), test from its test split."""
    import shutil

    for cls in classes:
        train_files = sorted((cifar / "train" / cls).iterdir())
        picks = {"train": train_files[:n_train], "val": train_files[n_train:n_train + n_val],
                 "test": sorted((cifar / "test" / cls).iterdir())[:n_test]}
        for split, files in picks.items():
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, out / split / cls / f.name)
    return out


# ---------------------------------------------------------------- this project


def run_ours(data: Path, work: Path, args, cold: bool = False) -> list[dict]:
    """This project's `dvc exp run` in a new project; `cold`: every stage in a process of its own
    (PIPELINE_WARM=0). With `args.again`, a second row: `dvc exp run -f` in the same project, every
    stage again, without the first run's one-time costs (the MLflow store created, DVC's first
    hashes of the data folder)."""
    project = bt.make_project(work / ("project-cold" if cold else "project"))
    bt.set_params(project, {"dataset": "folder", "data_dir": str(data), "model": "resnet18", "pretrained": False,
                            "epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch}
                  | {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    bt.run(["git", "commit", "-qam", "benchmark params"], project)
    env = {"PIPELINE_WARM": "0"} if cold else {}
    label = "this project" + (", cold stages" if cold else "")
    rows = [_measured(project, ["dvc", "exp", "run", "--name", "vs-ultralytics"], env, label)]
    if args.again:
        rows.append(_measured(project, ["dvc", "exp", "run", "-f", "--name", "vs-ultralytics-again"], env,
                              label + ", again in the same project"))
    return rows


def _measured(project: Path, cmd: list[str], env: dict[str, str], label: str) -> dict:
    wall, stages = timed_stages(cmd, project, env)
    timing = json.loads((project / "metrics/train_timing.json").read_text())
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    loop = timing["loop_seconds"]
    return {"tool": label, "warm_start": timing["warm_start"],
            "wall_s": round(wall, 1), "train_s": round(loop, 1),
            "steps_s": round(timing["train_seconds"], 1), "overhead_s": round(wall - loop, 1),
            "test_accuracy": round(evaluation["accuracy"], 4), "n_test": evaluation["n_test"],
            "first_epoch_s": round(timing["first_epoch_seconds"], 1), "later_epoch_s": round(timing["later_epoch_seconds"], 1),
            "precision": timing["precision"],
            "stages_s": {k: round(v - (loop if k == "train" else 0), 1) for k, v in stages.items()}}


def timed_stages(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """(wall seconds, seconds from each "Running stage 'NAME'" line DVC prints to the next or to
    its exit: the stage's command and DVC's own work on it; "dvc" the time before the first)."""
    import re

    t0 = time.perf_counter()
    marks, out = [("dvc", t0)], []
    proc = subprocess.Popen(cmd, cwd=cwd, env=bt.env() | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        out.append(line)
        if m := re.match(r"Running stage '([^']+)'", line):
            marks.append((m.group(1), time.perf_counter()))
    if proc.wait():
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(out)[-3000:]}")
    end = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [end]
    return end - t0, {name: t1 - t for (name, t), t1 in zip(marks, ends)}


# ---------------------------------------------------------------- Ultralytics


def ultralytics_python(venv: Path) -> Path | None:
    """The Python of a virtual environment with Ultralytics; None (with a line) when pip fails."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # this project's packages after its own: torch and torchvision are found, not downloaded again
        (Path(site) / "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if subprocess.run([str(python), "-c", "import ultralytics"], capture_output=True, check=False).returncode:
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", ULTRALYTICS],
                             capture_output=True, text=True, check=False)
        if pip.returncode:
            print(f"skipped Ultralytics: pip install {ULTRALYTICS} failed: {pip.stderr.strip().splitlines()[-1:]}")
            return None
    return python


ULTRALYTICS_RUN = """
import json, sys, time
from ultralytics import YOLO
data, cfg, epochs, imgsz, batch, out = sys.argv[1:7]
t0 = time.perf_counter()
model = YOLO(cfg, task="classify")
model.train(data=data, epochs=int(epochs), imgsz=int(imgsz), batch=int(batch), device="cpu", pretrained=False,
            plots=False, project=out, name="train", exist_ok=True, verbose=False)
train_s = time.perf_counter() - t0
metrics = YOLO(f"{out}/train/weights/best.pt").val(data=data, split="test", imgsz=int(imgsz), batch=int(batch),
                                                   device="cpu", plots=False, project=out, name="test", verbose=False)
print(json.dumps({"train_s": train_s, "test_accuracy": float(metrics.top1)}))
"""


def run_ultralytics(python: Path, data: Path, work: Path, args) -> dict:
    cfg = work / "yolo11-cls-resnet18-scratch.yaml"
    cfg.write_text(YOLO_RESNET18.format(nc=len(CLASSES)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as for ours (bt.env): compiled code cached, as in a user's shell
    env |= {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(work / "yolo-config")}  # no update checks, no fonts
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), "-c", ULTRALYTICS_RUN, str(data), str(cfg), str(args.epochs),
                           str(args.image_size), str(args.batch), str(work / "runs")],
                          cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"Ultralytics failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tool": ULTRALYTICS, "wall_s": round(wall, 1), "train_s": round(out["train_s"], 1),
            "test_accuracy": round(out["test_accuracy"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train", type=int, default=610, help="train images per class (default 610: 3,050 in all)")
    ap.add_argument("--val", type=int, default=84, help="validation images per class")
    ap.add_argument("--test", type=int, default=169, help="test images per class")
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "ultralytics-venv",
                    help="Ultralytics' own virtual environment (made when missing; default: %(default)s)")
    ap.add_argument("--only", choices=["ours", "ultralytics"])
    ap.add_argument("--again", action="store_true",
                    help="also time a second full run in the same project (`dvc exp run -f`): the overhead of a later run")
    ap.add_argument("--cold", action="store_true",
                    help="also run this project with every stage started cold (PIPELINE_WARM=0), to compare")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a param of this project's run, as `dvc exp run -S` takes it (e.g. train.precision=fp32)")
    bt.input_args(ap, weights=False)
    args = ap.parse_args()
    if not bt.use_inputs(args):
        return
    from pipeline.training.precision import cpu_name

    with bt.workspace("bench-vs-ultralytics-") as (work, cifar):
        data = split_once(cifar, work / "data", CLASSES, args.train, args.val, args.test)
        print(json.dumps({"data": str(data), "classes": CLASSES, "per_class": [args.train, args.val, args.test],
                          "epochs": args.epochs, "image_size": args.image_size, "batch": args.batch,
                          "cpus": os.cpu_count(), "cpu": cpu_name()}), flush=True)
        rows = {}
        if args.only in (None, "ultralytics") and (python := ultralytics_python(args.venv)):
            rows["ultralytics"] = run_ultralytics(python, data, work, args)
            print(json.dumps(rows["ultralytics"]), flush=True)
        if args.only in (None, "ours"):
            ours = run_ours(data, work, args)
            rows["ours"] = ours[0]
            for row in ours + (run_ours(data, work, args, cold=True) if args.cold else []):
                print(json.dumps(row), flush=True)
        if len(rows) == 2:
            ours, theirs = rows["ours"], rows["ultralytics"]
            print(json.dumps({"ratio_wall": round(ours["wall_s"] / theirs["wall_s"], 3),
                              "ratio_train": round(ours["train_s"] / theirs["train_s"], 3),
                              "accuracy_difference": round(ours["test_accuracy"] - theirs["test_accuracy"], 4)}))


if __name__ == "__main__":
    main()
