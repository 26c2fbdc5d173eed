"""Better models from the same data, on real photos and real weights: EMA of weights,
test-time augmentation, temperature scaling and a 3-model weighted ensemble.

A stratified CIFAR-10 subset (--train-per-class train + --test-per-class test images per class,
val carved out of train) at --size px, timm's tf_efficientnet_lite0 with the real ImageNet
weights (--weights), through the real stages in a temporary copy of the project:

1. three models: a linear probe; partial fine-tuning (the last stage and the head, --epochs);
   the same with `train.ema_decay` (--ema). Each evaluated with `evaluate.tta: hflip_crops`:
   accuracy plain and with TTA, ECE before and after temperature scaling, T, wall times.
2. `python -m pipeline ensemble` of the three checkpoints, weights fitted on the validation
   split: the ensemble's test accuracy, log loss and ECE beside each member's.

With `--seeds 0,1,2` instead: the ensemble people try first, the same partial fine-tuning
trained with each `seed` (one split: `data.split_seed` stays), each member's test figures and
the ensemble's (no TTA, none of the inside pictures: what differs is the seed alone).

The pictures of the probe's evaluate (activations, filters, embedding, label issues,
reliability) are copied to --pictures for a person to look at.

Needs the CIFAR-10 JPEG archive (--archive) and the ImageNet weights (--weights);
skips with a message where they are absent.
Run: python benchmarks/bench_better_models.py [--size 128] [--epochs 3] [--ema 0.99] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transfer as bt  # noqa: E402  (the CIFAR subset, project copies and runners)

EVAL_KEYS = ("accuracy", "accuracy_tta", "log_loss", "log_loss_calibrated", "log_loss_tta", "ece", "ece_calibrated",
             "ece_tta", "temperature")
PICTURES = ("activations.png", "filters.png", "embedding.png", "label_issues.png", "label_issues.csv",
            "reliability.png", "learning_curves.png")


def one_model(project: Path, name: str, updates: dict, members: Path) -> dict:
    bt.set_params(project, updates)
    t0 = time.perf_counter()
    seconds = bt.stages(project, ("check", "train"))
    seconds |= bt.stages(project, ("evaluate",))
    ev = json.loads((project / "metrics/eval.json").read_text())
    tr = json.loads((project / "metrics/train.json").read_text())
    shutil.copy(project / "models/model.pt", members / f"{name}.pt")
    result = {"model": name, **{k: ev.get(k) for k in EVAL_KEYS}, "best_val_accuracy": tr["best_val_accuracy"],
              "train_s": round(seconds["train"], 1), "evaluate_s": round(seconds["evaluate"], 1),
              "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--pictures", type=Path, default=Path("/tmp/better_models_pictures"))
    ap.add_argument("--seeds", default=None, help="e.g. 0,1,2: only the ensemble of one recipe trained with each seed")
    bt.input_args(ap)
    args = ap.parse_args()
    if not bt.use_inputs(args):
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = bt.subset(bt.unpack(tmp / "cifar10"), tmp / "subset", args.train_per_class, args.test_per_class)
        project = bt.make_project(tmp / "project")
        members = project / "members"
        members.mkdir()
        bt.set_params(project, {"dataset": "folder", "data_dir": str(data), "data.val_fraction": 0.1,
                                "model": bt.MODEL, "image_size": args.size, "weights": str(bt.WEIGHTS),
                                "augment.hflip": True, "evaluate.tta": "hflip_crops"})
        bt.run(["git", "commit", "-qam", "benchmark params"], project)
        bt.stages(project, ("check", "download", "prepare"))
        if args.seeds:
            return seed_ensemble(project, members, [int(x) for x in args.seeds.split(",")], args.epochs)
        results = [one_model(project, "probe", {"finetune": "linear_probe"}, members)]
        args.pictures.mkdir(parents=True, exist_ok=True)
        for name in PICTURES:
            shutil.copy(project / "metrics" / name, args.pictures / name)
        partial = {"finetune": "partial", "epochs": args.epochs}
        results.append(one_model(project, "partial", partial | {"train.ema_decay": 0}, members))
        results.append(one_model(project, "partial_ema", partial | {"train.ema_decay": args.ema}, members))
        t0 = time.perf_counter()
        bt.run([sys.executable, "-m", "pipeline", "ensemble", *(str(members / f"{r['model']}.pt") for r in results)],
               project)
        ens = json.loads((project / "metrics/ensemble.json").read_text())
        print(json.dumps({"ensemble": ens, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
        print(f"pictures of the probe's evaluate: {args.pictures}")


def seed_ensemble(project: Path, members: Path, seeds: list[int], epochs: int) -> None:
    """The same partial fine-tuning with each seed (the split stays: data.split_seed), then
    `pipeline ensemble` of them."""
    quick = {"finetune": "partial", "epochs": epochs, "evaluate.tta": "none", "evaluate.activations": False,
             "evaluate.filters": False, "evaluate.embedding": False, "evaluate.label_issues": False}
    results = [one_model(project, f"seed{seed}", quick | {"seed": seed}, members) for seed in seeds]
    t0 = time.perf_counter()
    bt.run([sys.executable, "-m", "pipeline", "ensemble", *(str(members / f"{r['model']}.pt") for r in results)],
           project)
    ens = json.loads((project / "metrics/ensemble.json").read_text())
    print(json.dumps({"seed_ensemble": ens, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
