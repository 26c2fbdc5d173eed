"""Model selection on real photos and real weights: 5-fold cross-validation and a small search.

A stratified CIFAR-10 subset (--train-per-class train + --test-per-class test images per class,
val carved out of train) at --size px, timm's tf_efficientnet_lite0 with the real ImageNet
weights (--weights), linear probe (cached features), run through the real stages in
a temporary copy of the project:

1. `crossval.folds: 5`: the train stage, its five folds first; mean ± std of accuracy, wall time
   (the folds and the model), beside the single validation figure and the test accuracy of the same setup.
2. `python -m pipeline tune --trials N` over `transfer.probe_l2` (log range 1e-4 … 1) with the
   objective best_val_accuracy: each trial a DVC experiment; the best value and params, wall time.

Needs the CIFAR-10 JPEG archive (--archive) and the ImageNet weights (--weights);
skips with a message where they are absent.
Run: python benchmarks/bench_model_selection.py [--size 128] [--trials 6]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer as bt  # noqa: E402  (the CIFAR subset, project copies and runners)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--only", choices=["crossval", "tune"], default=None, help="one part (both by default)")
    bt.input_args(ap)
    args = ap.parse_args()
    if not bt.use_inputs(args):
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cifar = bt.unpack(tmp / "cifar10")
        data = bt.subset(cifar, tmp / "subset", args.train_per_class, args.test_per_class)
        project = bt.make_project(tmp / "project")
        bt.set_params(project, {"dataset": "folder", "data_dir": str(data), "data.val_fraction": 0.1,
                                "model": bt.MODEL, "image_size": args.size, "weights": str(bt.WEIGHTS),
                                "finetune": "linear_probe", "augment.hflip": True})
        bt.run(["git", "commit", "-qam", "benchmark params"], project)
        single = bt.stages(project, ("check", "download", "prepare", "train", "evaluate"))
        val = json.loads((project / "metrics/train.json").read_text())["best_val_accuracy"]
        test = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
        print(json.dumps({"single_split": {"val_accuracy": val, "test_accuracy": test,
                                           "train_s": round(single["train"], 1)}}), flush=True)

        if args.only != "tune":
            bt.set_params(project, {"crossval.folds": 5})
            t0 = time.perf_counter()
            bt.run([sys.executable, "-m", "stages.train"], project)  # the 5 folds, then the model
            cv = json.loads((project / "metrics/crossval.json").read_text())
            print(json.dumps({"crossval_5_fold": {"accuracy_mean": cv["accuracy"]["mean"], "accuracy_std": cv["accuracy"]["std"],
                                                  "per_fold": cv["accuracy"]["per_fold"],
                                                  "log_loss_mean": cv["log_loss"]["mean"],
                                                  "wall_s": round(time.perf_counter() - t0, 1)}}), flush=True)
        if args.only == "crossval":
            return
        bt.set_params(project, {"crossval.folds": 0,
                                "tune.space": {"transfer.probe_l2": {"low": 0.0001, "high": 1.0, "log": True}}})
        bt.run(["git", "commit", "-qam", "search space"], project)
        t0 = time.perf_counter()
        bt.run([sys.executable, "-m", "pipeline", "tune", "--trials", str(args.trials)], project)
        result = json.loads((project / "metrics/tune.json").read_text())
        print(json.dumps({"tune": {"trials": len(result["trials"]), "best_value": result["best_value"],
                                   "best_params": result["best_params"],
                                   "values": [t["value"] for t in result["trials"]],
                                   "wall_s": round(time.perf_counter() - t0, 1)}}), flush=True)


if __name__ == "__main__":
    main()
