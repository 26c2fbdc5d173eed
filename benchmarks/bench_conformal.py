"""Prediction sets on real photos with real ImageNet weights: does the coverage the sets promise
hold on test images, and how large are the sets, for a linear probe and a fine-tune?

CIFAR-10 subset (500 train + 200 test photos per class, val carved out of train: the split the
sets are calibrated on), `tf_efficientnet_lite0` on its ImageNet weights (--weights) at --size
px, through the real stages in a temporary copy of the project:
  - probe:   finetune=linear_probe;
  - partial: finetune=partial (2 stages + head), --epochs epochs.
For each, evaluate runs at evaluate.conformal_alpha = 0.1 and again at 0.05 (only evaluate
re-runs: the checkpoint holds the validation scores every α needs). Reported per run and α:
test accuracy, coverage (the share of test images whose set holds the true class; the promise is
≥ 1 − α), mean and median set size, the share of one-class sets and the accuracy on them (the
images `pipeline predict --abstain` answers).

Needs the CIFAR-10 JPEG archive (--archive) and the weights (--weights); skips with a message
where they are absent. CIFAR_DIR=<dir> reuses an unpacked archive.
Run: python benchmarks/bench_conformal.py [--size 128] [--epochs 3] [--only probe|partial] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_transfer as bt  # the shared inputs, the CIFAR subset, projects and stages

ALPHAS = (0.1, 0.05)
KEYS = ("accuracy", "coverage", "set_size_mean", "set_size_median", "singleton_share", "singleton_accuracy")
RUNS = {"probe": lambda epochs: {"finetune": "linear_probe"},
        "partial": lambda epochs: {"finetune": "partial", "transfer.unfreeze_stages": 2, "epochs": epochs}}


def one_run(work: Path, data: Path, name: str, size: int, epochs: int) -> list[dict]:
    project = work / f"project-{name}"
    project.mkdir(parents=True)
    bt.make_project(project)
    bt.set_params(project, {"dataset": "folder", "data_dir": str(data), "model": bt.MODEL, "weights": str(bt.WEIGHTS),
                            "image_size": size, "augment.hflip": True, "evaluate.activations": False,
                            "evaluate.filters": False, "evaluate.embedding": False, "evaluate.label_issues": False}
                  | RUNS[name](epochs))
    rows = []
    for i, alpha in enumerate(ALPHAS):
        bt.set_params(project, {"evaluate.conformal_alpha": alpha})
        seconds = bt.stages(project, ("check", "prepare", "train", "evaluate") if i == 0 else ("evaluate",))
        metrics = json.loads((project / "metrics/eval.json").read_text())
        rows.append({"run": name, "alpha": alpha, **{k: metrics[k] for k in KEYS}, "n_test": metrics["n_test"],
                     "seconds": round(sum(seconds.values()), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | α | test accuracy | coverage (promise ≥ 1 − α) | mean set size | median | one-class sets | "
             "accuracy on them |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['alpha']:g} | {r['accuracy']:.4f} | {r['coverage']:.4f} (≥ {1 - r['alpha']:g}) | "
              f"{r['set_size_mean']:.2f} | {r['set_size_median']:g} | {r['singleton_share']:.1%} | "
              f"{r['singleton_accuracy']:.4f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.input_args(ap)
    ap.add_argument("--size", type=int, default=128, help="image_size (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the partial fine-tune (default %(default)s)")
    ap.add_argument("--only", choices=list(RUNS), help="one of the runs")
    ap.add_argument("--keep", type=Path, help="work here and keep it instead of a temporary folder")
    args = ap.parse_args()
    if not bt.use_inputs(args):
        return
    with tempfile.TemporaryDirectory(prefix="bench-conformal-") as t:
        work = args.keep.resolve() if args.keep else Path(t)
        work.mkdir(parents=True, exist_ok=True)
        cifar = bt.unpack(Path(os.environ.get("CIFAR_DIR", work / "cifar10")))
        data = work / "cifar-subset"
        if not data.exists():
            bt.subset(cifar, data, 500, 200)
        rows = [r for name in RUNS if args.only in (None, name) for r in one_run(work, data, name, args.size, args.epochs)]
        print()
        print(table(rows))


if __name__ == "__main__":
    main()
