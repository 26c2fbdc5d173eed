"""Multi-label classification on real photos with real ImageNet weights: how close does the
pipeline's task=multilabel come to what the frozen features allow, and what does partial
fine-tuning buy?

Data: 2×2 mosaics (64×64 px JPEGs, quality 95) of four CIFAR-10 photos; a mosaic's labels are
the classes present in it (1 to 4 of the 10). Per mosaic k ~ uniform{1, 2, 3, 4} classes are drawn
(distinct, uniformly), then each of the four tiles takes a class uniformly from those k and an
unused photo of that class, so a class often fills several tiles, as objects repeat in real
scenes: label-set sizes are in expectation 29.4 % one, 43.0 % two, 25.2 % three, 2.3 % four
labels, mean 2.00 (exact over the scheme; the written set's own counts are printed).
Train mosaics use only CIFAR's train photos, test mosaics only its test photos, and no photo is
used twice (so the validation split the pipeline carves out of train shares none with train
either). Written as <dir>/images/{train,test}/NNNNN.jpg and <dir>/labels.csv
(path,labels,split; labels sorted and joined by ";"), seeded.

Runs, each through the real stages (`python -m stages.NAME`: check, prepare, train, evaluate) in a
temporary copy of the project (git's files as they are in the working tree) with dataset=folder, data_dir=<mosaics>, task=multilabel,
data.labels_csv=labels.csv, data.label_separator=";", model=tf_efficientnet_lite0 on the ImageNet
weights given by --weights, image_size=--size, augment.hflip (a mirrored mosaic has the same
labels) and augment.resized_crop off (a random-resized crop can cut tiles out of the picture and
so labels out of the image while they stay in its label set):
  - probe:   finetune=linear_probe (cached features, the head alone);
  - partial: finetune=partial, transfer.unfreeze_stages=2, --epochs epochs;
  - ceiling: scikit-learn OneVsRestClassifier(LogisticRegression) on the *same* frozen features
    of the prepared splits (standardised on train), C picked on the validation split by macro
    mAP; scored on test: mAP (macro, micro), and F1 (micro, macro) and subset accuracy with one
    threshold per label chosen on validation: the score that maximises that label's validation
    F1 (predict the label when its probability ≥ the threshold; ties: the lowest such score;
    0.5 for a label with no positive in validation). Its F1 at a flat 0.5 is recorded as well.
    Computed on the probe's prepared splits; alone (--only ceiling), on a copy run to prepare.
Reported: map_macro, map_micro, f1_micro, f1_macro, subset_accuracy (from metrics/eval.json for
the pipeline's runs) and seconds (the stages' wall time, or the ceiling's features + fits), and
the probe's map_macro ÷ the ceiling's (target ≥ 0.99, as for single-label).

Needs the CIFAR-10 JPEG archive (--archive) and the ImageNet weights (--weights); skips with a
message where they are absent (--only mosaics needs the archive alone). CIFAR_DIR=<dir> reuses an
unpacked archive (<dir>/{train,test}/<class>/*.jpg).
Run: python benchmarks/bench_multilabel.py [--size 128] [--epochs 3] [--train 5000] [--test 1000]
         [--seed 0] [--only probe|partial|probe-asl|partial-asl|ceiling|mosaics] [--asl] [--keep DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_transfer as bt  # the shared inputs, unpacking and project helpers

TILE = 32  # CIFAR's photos; a mosaic is 2×2 of them
MAX_CLASSES_PER_MOSAIC = 4
JPEG_QUALITY = 95
METRICS = ("map_macro", "map_micro", "f1_micro", "f1_macro", "subset_accuracy")
STAGES = ("check", "prepare", "train", "evaluate")
C_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # the ceiling's C: wide, so its best is inside


# ---------------------------------------------------------------- the mosaics


def make_mosaics(cifar_dir: Path, out_dir: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """2×2 mosaics of CIFAR-10 photos (see the module's docstring for the scheme): writes
    out_dir/images/{train,test}/NNNNN.jpg and out_dir/labels.csv; returns a summary (label-set
    sizes and class frequencies per split). Same arguments, same files."""
    import numpy as np
    from PIL import Image

    cifar_dir, out_dir = Path(cifar_dir), Path(out_dir)
    classes = sorted(p.name for p in (cifar_dir / "train").iterdir() if p.is_dir())
    if classes != sorted(p.name for p in (cifar_dir / "test").iterdir() if p.is_dir()):
        raise ValueError(f"{cifar_dir}: train/ and test/ have different class folders")
    rng = np.random.default_rng(seed)
    rows, summary = [], {"seed": seed, "classes": classes}
    for split, n in (("train", n_train), ("test", n_test)):
        # each class's photos in a seeded order, taken one after another: no photo used twice
        pools = {}
        for c in classes:
            files = sorted((cifar_dir / split / c).glob("*.jpg"))
            pools[c] = [files[i] for i in rng.permutation(len(files))]
        taken = Counter()
        folder = out_dir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        sizes = Counter()
        per_class = Counter()
        for i in range(n):
            k = int(rng.integers(1, MAX_CLASSES_PER_MOSAIC + 1))
            chosen = rng.choice(len(classes), size=k, replace=False)
            tiles = [classes[int(chosen[j])] for j in rng.integers(0, k, size=4)]
            mosaic = Image.new("RGB", (2 * TILE, 2 * TILE))
            for t, cls in enumerate(tiles):
                if taken[cls] >= len(pools[cls]):
                    raise ValueError(f"{split}: {n} mosaics need more than the {len(pools[cls])} {cls} photos of "
                                     f"{cifar_dir / split / cls} (no photo is used twice); ask for fewer")
                with Image.open(pools[cls][taken[cls]]) as im:
                    tile = im.convert("RGB")
                taken[cls] += 1
                if tile.size != (TILE, TILE):
                    tile = tile.resize((TILE, TILE), Image.Resampling.BICUBIC)
                mosaic.paste(tile, ((t % 2) * TILE, (t // 2) * TILE))
            rel = f"images/{split}/{i:05d}.jpg"
            mosaic.save(out_dir / rel, quality=JPEG_QUALITY)
            labels = sorted(set(tiles))
            rows.append((rel, ";".join(labels), split))
            sizes[len(labels)] += 1
            per_class.update(labels)
        summary[split] = {"mosaics": n, "label_set_sizes": {s: sizes[s] for s in sorted(sizes)},
                          "mean_labels": sum(s * c for s, c in sizes.items()) / max(n, 1),
                          "images_with_class": {c: per_class[c] for c in classes}}
    with open(out_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("path", "labels", "split"))
        w.writerows(rows)
    return summary


def mosaics_in(work: Path, cifar: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, dict]:
    """The mosaics under work/mosaics, made once per (sizes, seed): a kept folder is reused."""
    out = work / "mosaics"
    stamp = work / "mosaics.json"  # beside the data folder, not in it
    key = {"train": n_train, "test": n_test, "seed": seed, "archive": str(bt.ARCHIVE)}
    if stamp.exists() and (out / "labels.csv").exists():
        made = json.loads(stamp.read_text())
        if made.get("key") == key:
            return out, made["summary"]
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    summary = make_mosaics(cifar, out, n_train, n_test, seed)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    stamp.write_text(json.dumps({"key": key, "summary": summary}, indent=1))
    return out, summary


# ---------------------------------------------------------------- the ceiling


def frozen_features(project: Path, weights: Path) -> tuple[dict, float]:
    """{split: (features N×D, y N×C)} of the prepared splits: the frozen backbone's penultimate
    features under the evaluation preprocessing, as bench_transfer's `ceiling` computes them."""
    sys.path.insert(0, str(project))
    os.chdir(project)
    import numpy as np

    from pipeline.models.weights import build_transfer_model
    from pipeline.prepared import load_meta, load_split
    from pipeline.core.preprocess import Preprocessing
    from pipeline.training.probe import extract_features

    meta = load_meta()
    prep = Preprocessing.from_dict(meta["preprocessing"])
    model, _ = build_transfer_model(bt.MODEL, len(meta["classes"]), False, str(weights), {})
    t0 = time.perf_counter()
    feats = {}
    for s in ("train", "val", "test"):
        x, y = load_split(s)
        y = np.asarray(y)
        if y.ndim != 2:
            raise ValueError(f"data/prepared/{s}_y.npy is {y.shape}, not N×C k-hot: was task=multilabel prepared?")
        feats[s] = (extract_features(model, x, prep), y.astype(np.uint8))
    return feats, time.perf_counter() - t0


def per_label_thresholds(y, p):
    """For each label, the validation score that maximises its F1 (predict when p ≥ it; ties: the
    lowest such score); 0.5 for a label without a positive."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    out = np.full(y.shape[1], 0.5)
    for j in range(y.shape[1]):
        if y[:, j].sum() == 0:
            continue
        precision, recall, thresholds = precision_recall_curve(y[:, j], p[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        out[j] = thresholds[int(np.argmax(f1))]
    return out


def scores(y, p, thresholds) -> dict:
    import numpy as np
    from sklearn.metrics import average_precision_score, f1_score

    pred = (p >= thresholds).astype(np.uint8)
    return {"map_macro": float(average_precision_score(y, p, average="macro")),
            "map_micro": float(average_precision_score(y, p, average="micro")),
            "f1_micro": float(f1_score(y, pred, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
            "subset_accuracy": float((pred == y).all(axis=1).mean())}


def ceiling(project: Path, weights: Path) -> dict:
    """OneVsRest logistic regression on the frozen features of a prepared project's splits: C by
    validation macro mAP; test mAP, and F1 / subset accuracy at validation-chosen per-label thresholds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    feats, t_features = frozen_features(project, weights)
    scaler = StandardScaler().fit(feats["train"][0])
    f = {s: (scaler.transform(x), y) for s, (x, y) in feats.items()}
    best, by_c = None, {}
    for c in C_GRID:
        clf = OneVsRestClassifier(LogisticRegression(C=c, max_iter=3000)).fit(*f["train"])
        val = float(average_precision_score(f["val"][1], clf.predict_proba(f["val"][0]), average="macro"))
        by_c[c] = round(val, 4)
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    thresholds = per_label_thresholds(f["val"][1], clf.predict_proba(f["val"][0]))
    p_test = clf.predict_proba(f["test"][0])
    result = scores(f["test"][1], p_test, thresholds)
    flat = scores(f["test"][1], p_test, 0.5)
    return result | {"losses": loss_comparison(f), "f1_micro_at_0.5": flat["f1_micro"], "f1_macro_at_0.5": flat["f1_macro"],
                     "subset_accuracy_at_0.5": flat["subset_accuracy"], "val_map_macro": val, "C": c,
                     "val_map_macro_by_C": by_c, "thresholds": [round(float(t), 4) for t in thresholds],
                     "features": {s: list(x.shape) for s, (x, _) in feats.items()},
                     "seconds": time.perf_counter() - t0, "feature_seconds": t_features}


def loss_comparison(f: dict) -> dict:
    """A linear head on the standardised frozen features trained with binary cross-entropy and
    with the asymmetric loss, alike otherwise (full-batch L-BFGS, L2 λ picked on validation mAP
    from one grid): test mAP and F1 at validation thresholds of each. Does ASL earn a place in
    the pipeline?"""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score

    from pipeline.training.objective import asymmetric_loss  # the pipeline's own (train.asymmetric_loss)

    torch.manual_seed(0)
    (xt, yt), (xv, yv), (xs, ys) = ([torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in f[s]]
                                    for s in ("train", "val", "test"))
    losses = {"bce": lambda z, y: torch.nn.functional.binary_cross_entropy_with_logits(z, y),
              "asl": asymmetric_loss}
    out = {}
    for name, loss in losses.items():
        best = None
        for l2 in (1e-4, 1e-3, 1e-2, 3e-2, 0.1):
            head = torch.nn.Linear(xt.shape[1], yt.shape[1])
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            opt = torch.optim.LBFGS(head.parameters(), max_iter=300, history_size=20, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                value = loss(head(xt), yt) + l2 / 2 * head.weight.pow(2).sum()
                value.backward()
                return value
            opt.step(closure)
            with torch.no_grad():
                pv = torch.sigmoid(head(xv)).numpy()
                val = float(average_precision_score(yv.numpy(), pv, average="macro"))
                if best is None or val > best[0]:
                    best = (val, l2, pv, torch.sigmoid(head(xs)).numpy())
        val, l2, pv, ps = best
        out[name] = scores(ys.numpy(), ps, per_label_thresholds(yv.numpy(), pv)) | {"val_map_macro": val, "l2": l2}
    return out


def ceiling_in_subprocess(project: Path) -> dict:
    """`ceiling` in a fresh interpreter, in the project (its own copy of the library imported)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_multilabel as b; "
            f"from pathlib import Path; print(json.dumps(b.ceiling(Path({str(project)!r}), Path({str(bt.WEIGHTS)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=project, env=bt.env(), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"ceiling failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the pipeline's runs


def base_params(mosaics: Path, size: int) -> dict:
    return {"dataset": "folder", "data_dir": str(mosaics), "task": "multilabel", "data.labels_csv": "labels.csv",
            "data.label_separator": ";", "model": bt.MODEL, "weights": str(bt.WEIGHTS), "image_size": size,
            "augment.hflip": True, "augment.resized_crop": False}


RUNS = {
    "probe": lambda epochs: {"finetune": "linear_probe"},
    "partial": lambda epochs: {"finetune": "partial", "transfer.unfreeze_stages": 2, "epochs": epochs},
    "probe-asl": lambda epochs: {"finetune": "linear_probe", "train.asymmetric_loss": True},
    "partial-asl": lambda epochs: {"finetune": "partial", "transfer.unfreeze_stages": 2, "epochs": epochs,
                                   "train.asymmetric_loss": True},
}


def fresh_project(work: Path, name: str) -> Path:
    dest = work / f"project-{name}"
    if dest.exists():  # a kept folder from an earlier run: made again
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    bt.make_project(dest)
    return dest


def pipeline_run(work: Path, name: str, mosaics: Path, size: int, epochs: int) -> tuple[dict, Path]:
    project = fresh_project(work, name)
    bt.set_params(project, base_params(mosaics, size) | RUNS[name](epochs))
    times = bt.stages(project, STAGES)
    metrics = json.loads((project / "metrics/eval.json").read_text())
    missing = [k for k in METRICS if k not in metrics]
    if missing:
        sys.exit(f"{name}: metrics/eval.json lacks {missing}; it has {sorted(metrics)}")
    row = {"run": name} | {k: metrics[k] for k in METRICS} | {
        "seconds": sum(times.values()), "stage_seconds": {k: round(v, 1) for k, v in times.items()}}
    train = project / "metrics/train.json"
    if train.exists():
        row["lr"] = json.loads(train.read_text()).get("lr")
    return row, project


def prepared_project(work: Path, mosaics: Path, size: int) -> Path:
    """A project with the probe's params, prepared (check, prepare) but not trained: for the ceiling alone."""
    project = fresh_project(work, "ceiling")
    bt.set_params(project, base_params(mosaics, size) | RUNS["probe"](0))
    bt.stages(project, ("check", "prepare"))
    return project


# ---------------------------------------------------------------- output


def table(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| run | " + " | ".join(METRICS) + " | seconds |", "|---" * (len(METRICS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(cell(r.get(k, "")) for k in METRICS)
                     + f" | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.input_args(ap)
    bt.finetune_args(ap)
    ap.add_argument("--train", type=int, default=5000, help="train mosaics, from CIFAR's train photos; the pipeline "
                    "carves val out of them (default %(default)s)")
    ap.add_argument("--test", type=int, default=1000, help="test mosaics, from CIFAR's test photos (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the mosaics (default %(default)s)")
    ap.add_argument("--only", choices=[*RUNS, "ceiling", "mosaics"],
                    help="one part (mosaics: make them and print their label-set sizes)")
    ap.add_argument("--asl", action="store_true", help="also the probe and the partial fine-tune with "
                    "train.asymmetric_loss (2 more runs)")
    ap.add_argument("--keep", type=Path, help="work here and keep it (unpacked CIFAR, mosaics, projects) instead of "
                    "a temporary folder; kept mosaics are reused when sizes and seed match")
    args = ap.parse_args()
    if args.only == "mosaics":
        del args.weights  # only the archive is needed
    if not bt.use_inputs(args):
        return
    with bt.workspace("bench-multilabel-", args.keep) as (work, cifar):
        mosaics, summary = mosaics_in(work, cifar, args.train, args.test, args.seed)
        result: dict = {"mosaics": summary | {"dir": str(mosaics)}, "runs": []}
        print(json.dumps({"mosaics": {s: {k: summary[s][k] for k in ("mosaics", "label_set_sizes", "mean_labels")}
                                      for s in ("train", "test")}}), flush=True)
        if args.only == "mosaics":
            if args.keep:
                print(f"mosaics: {mosaics}")
            return
        rows = result["runs"]
        for name in RUNS:
            if args.only == name or args.only is None and (name in ("probe", "partial") or args.asl):
                row, project = pipeline_run(work, name, mosaics, args.size, args.epochs)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if name == "probe" and args.only is None:  # the ceiling on the probe's own prepared splits
                    rows.append({"run": "ceiling (OneVsRest LogisticRegression, same features)"}
                                | ceiling_in_subprocess(project))
                    print(json.dumps(rows[-1]), flush=True)
        if args.only == "ceiling":
            rows.append({"run": "ceiling (OneVsRest LogisticRegression, same features)"}
                        | ceiling_in_subprocess(prepared_project(work, mosaics, args.size)))
            print(json.dumps(rows[-1]), flush=True)
        probe = next((r for r in rows if r["run"] == "probe"), None)
        ceil = next((r for r in rows if r["run"].startswith("ceiling")), None)
        if probe and ceil:
            result["probe_over_ceiling_map_macro"] = probe["map_macro"] / ceil["map_macro"]
        result["settings"] = {"size": args.size, "epochs": args.epochs, "model": bt.MODEL, "weights": str(bt.WEIGHTS)}
        print(json.dumps(result, indent=2))
        print()
        print(table(rows))
        if "probe_over_ceiling_map_macro" in result:
            print(f"\nprobe map_macro / ceiling map_macro = {result['probe_over_ceiling_map_macro']:.4f}")
        if args.keep:
            (work / "results.json").write_text(json.dumps(result, indent=2))
            print(f"kept: {work}")


if __name__ == "__main__":
    main()
