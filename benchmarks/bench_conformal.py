"""Prediction sets and the INT8 export on real photos with real ImageNet weights: does the
coverage the sets promise hold on test images, how large are the sets, and what does INT8 cost
in accuracy and buy in size and speed, for a linear probe and a fine-tune?

CIFAR-10 subset (500 train + 200 test photos per class, val carved out of train: the split the
sets are calibrated on), `tf_efficientnet_lite0` on its ImageNet weights (--weights) at --size
px, through the real stages in a temporary copy of the project:
  - probe:   finetune=linear_probe;
  - partial: finetune=partial (2 stages + head), --epochs epochs.
For each, evaluate runs at evaluate.conformal_alpha = 0.1 and again at 0.05 (only evaluate
re-runs: the checkpoint holds the validation scores every α needs). Reported per run and α:
test accuracy, coverage (the share of test images whose set holds the true class; the promise is
≥ 1 − α), mean and median set size, the share of one-class sets and the accuracy on them (the
images `pipeline predict --abstain` answers). Then export runs with export.int8 (max_drop
1, so a loss is reported and timed rather than refused): FP32 against INT8 test accuracy, top-1
agreement, file size, batch-1 and batch-32 ONNX Runtime latency. `--int8-only` does that part
alone on the projects a `--keep` folder holds.

Needs the CIFAR-10 JPEG archive (--archive) and the weights (--weights); skips with a message
where they are absent. CIFAR_DIR=<dir> reuses an unpacked archive.
Run: python benchmarks/bench_conformal.py [--size 128] [--epochs 3] [--only probe|partial] [--keep DIR] [--int8-only]
"""
from __future__ import annotations

import argparse
import json
import sys
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


def int8_run(project: Path, name: str) -> dict:
    """export with export.int8 on a trained project (its library brought up to this checkout's,
    for a project kept from an earlier run): the INT8 figures beside the FP32 ones."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z", "pipeline", "stages"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    for rel in filter(None, files.split("\0")):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, project / rel)
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = project / "params.yaml"
    if "\nexport:" not in params.read_text():  # a project from before export's params: the section added
        params.write_text(params.read_text() + "\nexport:\n  int8: true\n  int8_on_drop: keep_fp32\n")
    bt.set_params(project, {"export.int8": True, "export.int8_max_drop": 1.0})  # kept whatever it loses: timed too
    seconds = bt.stages(project, ("export",))["export"]
    m = json.loads((project / "metrics/export.json").read_text())
    t = json.loads((project / "metrics/export_timing.json").read_text())
    row = {"run": name, **{k: m[k] for k in ("fp32_accuracy", "int8_accuracy", "int8_accuracy_drop",
                                             "int8_top1_agreement", "onnx_bytes", "int8_bytes", "int8_kept")},
           **{k: round(v, 2) for k, v in t.items() if k.startswith(("fp32_latency", "int8_latency"))},
           "export_seconds": round(seconds, 1)}
    print(json.dumps(row), flush=True)
    return row


def int8_table(rows: list[dict]) -> str:
    lines = ["| run | FP32 accuracy | INT8 accuracy | drop | top-1 agreement | size FP32 → INT8 | batch-1 ms FP32 → INT8 | "
             "batch-32 ms FP32 → INT8 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['fp32_accuracy']:.4f} | {r['int8_accuracy']:.4f} | {r['int8_accuracy_drop']:+.4f} | "
              f"{r['int8_top1_agreement']:.4f} | {r['onnx_bytes'] / 1e6:.2f} → {r['int8_bytes'] / 1e6:.2f} MB | "
              f"{r.get('fp32_latency_ms_batch1', float('nan')):.1f} → {r.get('int8_latency_ms_batch1', float('nan')):.1f} | "
              f"{r.get('fp32_latency_ms_batch32', float('nan')):.1f} → {r.get('int8_latency_ms_batch32', float('nan')):.1f} |"
              for r in rows]
    return "\n".join(lines)


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
    bt.finetune_args(ap)
    ap.add_argument("--only", choices=list(RUNS), help="one of the runs")
    ap.add_argument("--keep", type=Path, help="work here and keep it instead of a temporary folder")
    ap.add_argument("--int8-only", action="store_true", help="only the INT8 export, on the trained projects in --keep")
    args = ap.parse_args()
    if not bt.use_inputs(args):
        return
    with bt.workspace("bench-conformal-", args.keep) as (work, cifar):
        data = work / "cifar-subset"
        if not data.exists():
            bt.subset(cifar, data, 500, 200)
        names = [name for name in RUNS if args.only in (None, name)]
        rows = [] if args.int8_only else [r for name in names for r in one_run(work, data, name, args.size, args.epochs)]
        int8_rows = [int8_run(work / f"project-{name}", name) for name in names]
        print()
        if rows:
            print(table(rows) + "\n")
        print(int8_table(int8_rows))


if __name__ == "__main__":
    main()
