"""Transfer-learning benchmark on real ImageNet weights and real photos: does the pipeline reach
what the frozen features allow, and what does fine-tuning buy?

Two parts, each run through the real stages (`python -m stages.NAME`, or `dvc exp run`) in a
temporary copy of the project:

A. CIFAR-10 subset (stratified: 500 train + 200 test images per class; val carved out of train)
   at --size px with timm's tf_efficientnet_lite0 and the real ImageNet weights in
   given by --weights: accuracy and wall time of
     - scratch: the same model from random weights, --epochs epochs (full fine-tune recipe);
     - linear_probe: cached features, the head trained for the default 15 epochs;
     - two_phase: 1 epoch head only, then everything (backbone lr × 0.1), --epochs epochs;
     - ceiling: scikit-learn LogisticRegression on the *same* frozen features (C picked on the
       validation split), the reference a linear probe must reach (target: probe ≥ 0.99 × it).
B. "A folder of ~400 photos at 224 px": 2 CIFAR classes upscaled to 500×375 JPEGs, pre-split
   250 train / 150 test, `dvc exp run` of a linear probe, check to export (target < 60 s on 2
   CPU cores), with its accuracy beside the logistic-regression ceiling on its features.

Needs the CIFAR-10 JPEG archive (--archive) and the ImageNet weights (--weights); skips with a
message where they are absent.
Run: python benchmarks/bench_transfer.py [--size 128] [--epochs 4] [--only A|B]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # where a shared checkout keeps them
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0_imagenet.pth"
ARCHIVE, WEIGHTS = DEFAULT_ARCHIVE, DEFAULT_WEIGHTS  # set from --archive / --weights by `use_inputs`
MODEL = "tf_efficientnet_lite0"


def input_args(ap: argparse.ArgumentParser, weights: bool = True) -> None:
    """--archive (the CIFAR-10 JPEG tarball) and --weights (timm's tf_efficientnet_lite0 ImageNet
    state dict), the real data and weights the benchmarks measure on."""
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="cifar10-jpeg.tar.gz: the CIFAR-10 "
                    "images as JPEGs, <split>/<class>/*.jpg (default: %(default)s)")
    if weights:
        ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help=f"ImageNet weights of {MODEL} (a timm state dict; default: %(default)s)")


def finetune_args(ap: argparse.ArgumentParser, epochs: int = 3) -> None:
    """--size (the runs' image_size) and --epochs (of the fine-tune), as the transfer benchmarks take them."""
    ap.add_argument("--size", type=int, default=128, help="image_size of the runs (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=epochs, help="epochs of the fine-tune (default %(default)s)")


def use_inputs(args: argparse.Namespace) -> bool:
    """Take the paths from the arguments; False (with a line saying what is missing) when absent."""
    global ARCHIVE, WEIGHTS
    ARCHIVE, WEIGHTS = args.archive.resolve(), getattr(args, "weights", WEIGHTS).resolve()
    needed = [ARCHIVE, WEIGHTS] if "weights" in args else [ARCHIVE]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found (give them with --archive / --weights)")
    return not missing


# ---------------------------------------------------------------- data


@contextlib.contextmanager
def workspace(prefix: str, keep: Path | None = None):
    """(the benchmark's work folder, the unpacked CIFAR-10 JPEGs): `keep` when given (left in place),
    else a temporary folder; the archive is unpacked into it unless CIFAR_DIR names an unpacked one."""
    with tempfile.TemporaryDirectory(prefix=prefix) as t:
        work = keep.resolve() if keep else Path(t)
        work.mkdir(parents=True, exist_ok=True)
        yield work, unpack(Path(os.environ.get("CIFAR_DIR", work / "cifar10")))


def unpack(dest: Path) -> Path:
    if not (dest / "train").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(dest, filter="data")
    return dest


def subset(cifar: Path, out: Path, train_per_class: int, test_per_class: int, classes=None, upscale=None) -> Path:
    """A pre-split class-folder data set: the first n files of each class (sorted names: a
    fixed, class-balanced pick), copied, or upscaled to `upscale` (w, h) as JPEGs."""
    from PIL import Image

    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in classes or sorted(p.name for p in (cifar / split).iterdir()):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted((cifar / split / cls).iterdir())[:n]:
                if upscale:
                    with Image.open(f) as im:
                        im.convert("RGB").resize(upscale, Image.Resampling.BICUBIC).save(folder / f.name, quality=90)
                else:
                    shutil.copy2(f, folder / f.name)
    return out


# ---------------------------------------------------------------- a project to run stages in


def make_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    # what `make install` writes in a clone (the offline page of `dvc plots show`, git-ignored): else
    # the first check stage writes it, 1.5 s that a user's first run does not have
    subprocess.run([sys.executable, "-c", "from pipeline.dvcplots import ensure_page; ensure_page()"], cwd=dest,
                   check=True, capture_output=True)
    return dest


def set_params(project: Path, updates: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from pipeline.core.params import update_params_file

    update_params_file(project / "params.yaml", updates)


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # Python caches the compiled code, as it does in a user's shell
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONWARNINGS"] = "ignore"
    return e


def run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def stages(project: Path, names) -> dict[str, float]:
    return {n: run([sys.executable, "-m", f"stages.{n}"], project) for n in names}


# ---------------------------------------------------------------- the ceiling


def ceiling(project: Path) -> dict:
    """LogisticRegression on the frozen backbone's features of the prepared splits (evaluation
    preprocessing), C picked on val: the best a linear head on these features does."""
    sys.path.insert(0, str(project))
    os.chdir(project)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.models.weights import build_transfer_model
    from pipeline.prepared import load_meta, load_split
    from pipeline.core.preprocess import Preprocessing
    from pipeline.training.probe import extract_features

    meta = load_meta()
    prep = Preprocessing.from_dict(meta["preprocessing"])
    model, _ = build_transfer_model(MODEL, len(meta["classes"]), False, str(WEIGHTS), {})
    t0 = time.perf_counter()
    feats = {s: (extract_features(model, load_split(s)[0], prep), load_split(s)[1]) for s in ("train", "val", "test")}
    t_features = time.perf_counter() - t0
    scaler = StandardScaler().fit(feats["train"][0])
    f = {s: (scaler.transform(x), y) for s, (x, y) in feats.items()}
    best = None
    for c in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(*f["train"])
        val = clf.score(*f["val"])
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    return {"accuracy": float(clf.score(*f["test"])), "val_accuracy": float(val), "C": c,
            "seconds": time.perf_counter() - t0, "feature_seconds": t_features}


def ceiling_in_subprocess(project: Path) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_transfer as b; " \
           f"from pathlib import Path; print(json.dumps(b.ceiling(Path({str(project)!r}))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=project, env=env(), capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- part A


def part_a(cifar: Path, tmp: Path, size: int, epochs: int, only: list[str] | None = None) -> list[dict]:
    data = subset(cifar, tmp / "cifar-subset", 500, 200)
    base = {"dataset": "folder", "data_dir": str(data), "data.val_fraction": 0.1, "model": MODEL,
            "image_size": size, "augment.hflip": True}
    runs = {
        "scratch": {"epochs": epochs, "augment.resized_crop": True},
        "linear_probe": {"weights": str(WEIGHTS), "finetune": "linear_probe"},
        "two_phase": {"weights": str(WEIGHTS), "finetune": "two_phase", "epochs": epochs},
    }
    rows = []
    for name, updates in runs.items():
        if only and name not in only:
            continue
        project = make_project(tmp / f"a-{name}")
        set_params(project, base | updates)
        times = stages(project, ("check", "download", "prepare", "train", "evaluate"))
        accuracy = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
        rows.append({"run": name, "accuracy": accuracy, "train_s": times["train"], "wall_s": sum(times.values()),
                     "lr": json.loads((project / "metrics/train.json").read_text())["lr"]})
        print(json.dumps(rows[-1]), flush=True)
        if name == "linear_probe":
            c = ceiling_in_subprocess(project)
            rows.append({"run": "ceiling (LogisticRegression, same features)", "accuracy": c["accuracy"],
                         "train_s": c["seconds"], "wall_s": c["seconds"], "C": c["C"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------- part B


def part_b(cifar: Path, tmp: Path) -> dict:
    data = subset(cifar, tmp / "photos", 125, 75, classes=["cat", "dog"], upscale=(500, 375))
    project = make_project(tmp / "b-photos")
    run(["dvc", "repro", "check", "download"], project)  # the repo's own state before the experiment
    t0 = time.perf_counter()
    run(["dvc", "exp", "run", "-S", "dataset=folder", "-S", f"data_dir={data}", "-S", f"model={MODEL}",
         "-S", f"weights={WEIGHTS}", "-S", "finetune=linear_probe", "-S", "image_size=224"], project)
    wall = time.perf_counter() - t0
    accuracy = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
    c = ceiling_in_subprocess(project)
    return {"photos": 400, "dvc_exp_run_s": wall, "probe_accuracy": accuracy, "ceiling_accuracy": c["accuracy"],
            "ratio": accuracy / c["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="image size for part A (default 128)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of scratch and two_phase in part A (default 4)")
    ap.add_argument("--only", choices=["A", "B"], help="run one part")
    ap.add_argument("--runs", nargs="+", choices=["scratch", "linear_probe", "two_phase"], help="part A: only these")
    input_args(ap)
    args = ap.parse_args()
    if not use_inputs(args):
        return
    with workspace("bench-transfer-") as (tmp, cifar):
        result = {}
        if args.only in (None, "A"):
            result["A"] = part_a(cifar, tmp, args.size, args.epochs, args.runs)
            probe = next((r for r in result["A"] if r["run"] == "linear_probe"), None)
            ceil = next((r for r in result["A"] if r["run"].startswith("ceiling")), None)
            if probe and ceil:
                result["A_probe_over_ceiling"] = probe["accuracy"] / ceil["accuracy"]
        if args.only in (None, "B"):
            result["B"] = part_b(cifar, tmp)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
