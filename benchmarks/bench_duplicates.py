"""Duplicates and leakage on real photos: how many CIFAR-10 test images have a near-duplicate in
its training set, what finding them costs, and what they do to a test score.

1. Finding: prepare (`pipeline.data.prepare`) on all 60,000 CIFAR-10 JPEGs as a folder split by
   its maker (train/ and test/), at 32 px: its wall time and peak memory; then the finder alone
   on the same images (fingerprints, search, groups); the pairs it reports by splits, the share
   of test-train pairs whose two labels agree (a wrong pair agrees one time in ten), the share
   of planted copies of 500 test images found (resized, re-encoded, colour-shifted, cropped), and two
   pictures: the most alike test-train pairs, and a random sample of pairs just above the
   threshold, where wrong pairs would be (judge the precision by eye).
2. A model (`--model`): the pipeline's stages in a temporary copy of the project on the same
   folder (dataset=folder, data.leakage: report), a linear probe of tf_efficientnet_lite0 on
   its real ImageNet weights at --size px: test accuracy on all test images and on the clean
   ones (no near-duplicate in train/val), from metrics/eval.json.

Needs the CIFAR-10 JPEG archive (--archive) and, for 2, the weights (--weights); skips with a
message where they are absent. Writes its pictures and results.json to --out.
Run: python benchmarks/bench_duplicates.py [--model] [--size 128] [--out /tmp/bench-duplicates]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_transfer as bt  # noqa: E402  (the shared inputs, unpacking and project helpers)

FIND = """
import json, resource, sys, time
from pathlib import Path
from pipeline.core.params import DataParams
from pipeline.data.folder import scan_folder
from pipeline.data.prepare import prepare
t0 = time.perf_counter()
meta = prepare(scan_folder(Path(sys.argv[1])), 32, DataParams(duplicate_threshold=float(sys.argv[3])), Path(sys.argv[2]))
seconds = time.perf_counter() - t0
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"prepare_seconds": seconds, "peak_rss_mb": peak / 1024, "counts": meta["counts"], "leaked": meta["leaked"]}))
"""


def finder_alone(prepared: Path, threshold: float) -> dict:
    """The finder's own time on the prepared images: fingerprints, the search, the groups."""
    import numpy as np

    from pipeline.data import duplicates
    from pipeline.prepared import load_split

    images = np.concatenate([np.asarray(load_split(s, prepared)[0]) for s in ("train", "val", "test")])
    t0 = time.perf_counter()
    thumbs = np.stack([duplicates.fingerprint(im.transpose(1, 2, 0))[1] for im in images])
    t1 = time.perf_counter()
    pairs, _ = duplicates.near_pairs(thumbs, threshold)
    t2 = time.perf_counter()
    duplicates.components(len(images), pairs)
    t3 = time.perf_counter()
    return {"images": len(images), "fingerprint_seconds": round(t1 - t0, 1), "search_seconds": round(t2 - t1, 1),
            "groups_seconds": round(t3 - t2, 1), "finder_seconds": round(t3 - t0, 1)}


def planted(prepared: Path, threshold: float, n: int = 500) -> dict:
    """Copies of n random test images made the ways users make them: the share found (similarity
    to their original ≥ threshold), per kind of copy."""
    import io

    import numpy as np
    from PIL import Image, ImageEnhance

    from pipeline.data import duplicates
    from pipeline.prepared import load_split

    x = load_split("test", prepared)[0]
    pick = np.random.default_rng(0).choice(len(x), n, replace=False)

    def jpeg(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=30)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def crop(im: Image.Image, f: float, shift: bool = False) -> Image.Image:
        big = im.resize((320, 320), Image.BICUBIC)
        c = int(320 * f)
        box = (0, 0, 320 - 2 * c, 320 - 2 * c) if shift else (c, c, 320 - c, 320 - c)
        return big.crop(box).resize((32, 32), Image.BILINEAR, reducing_gap=3.0)

    kinds = {"downsized to half and back": lambda im: im.resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR),
             "JPEG quality 30": jpeg,
             "colour-shifted": lambda im: ImageEnhance.Contrast(ImageEnhance.Color(
                 ImageEnhance.Brightness(im).enhance(0.8)).enhance(1.4)).enhance(1.2),
             "cropped 3 % a side": lambda im: crop(im, 0.03), "cropped 5 % a side": lambda im: crop(im, 0.05),
             "cropped 6 % off one corner": lambda im: crop(im, 0.03, shift=True)}
    thumb = lambda im: duplicates.fingerprint(np.asarray(im))[1]  # noqa: E731
    originals = duplicates.descriptors(np.stack([thumb(Image.fromarray(x[i].transpose(1, 2, 0))) for i in pick]))
    out = {}
    for name, make in kinds.items():
        copies = duplicates.descriptors(np.stack([thumb(make(Image.fromarray(x[i].transpose(1, 2, 0)))) for i in pick]))
        out[name] = round(float(((copies * originals).sum(axis=1) >= threshold).mean()), 3)
    return out


def pictures(prepared: Path, out: Path, threshold: float) -> dict:
    """The most alike test-train pairs and a random sample just above the threshold."""
    import numpy as np
    import pandas as pd

    from pipeline.plots import pair_figure, save
    from pipeline.prepared import load_split

    pairs = pd.read_csv(prepared / "duplicates.csv", keep_default_na=False)
    manifest = pd.read_csv(prepared / "manifest.csv", keep_default_na=False)
    where = {p: (s, int(r)) for p, s, r in manifest[manifest["status"] == "used"][["path", "split", "row"]]
             .itertuples(index=False, name=None)}
    arrays = {s: load_split(s, prepared)[0] for s in ("train", "val", "test")}
    across = pairs[(pairs["split_a"] != pairs["split_b"]) & ((pairs["split_a"] == "test") | (pairs["split_b"] == "test"))]
    agree = float((across["class_a"] == across["class_b"]).mean()) if len(across) else float("nan")

    def draw(rows: pd.DataFrame, path: Path, title: str) -> None:
        image = lambda p: np.asarray(arrays[where[p][0]][where[p][1]])  # noqa: E731
        fig = pair_figure(np.stack([image(p) for p in rows["path_a"]]), np.stack([image(p) for p in rows["path_b"]]),
                          [f"{r.similarity:.3f} {r.class_a}/{r.class_b}" for r in rows.itertuples()], ("", ""), 8,
                          ["firebrick" if a != b else "black" for a, b in zip(rows["class_a"], rows["class_b"])])
        fig.suptitle(title, fontsize=10)
        save(fig, path)
    draw(across.head(32), out / "top_pairs.png", "The 32 most alike test-train pairs (red: the labels differ)")
    band = across[across["similarity"] < threshold + 0.01]
    draw(band.sample(min(32, len(band)), random_state=0).sort_values("similarity", ascending=False),
         out / "threshold_pairs.png", f"32 random test-train pairs in [{threshold}, {threshold + 0.01}) "
         "(red: the labels differ)")
    return {"pairs": int(len(pairs)), "exact_pairs": int((pairs["kind"] == "exact").sum()),
            "test_train_or_val_pairs": int(len(across)), "label_agreement_of_those": round(agree, 3),
            "pairs_just_above_threshold": int(len(band)),
            "label_agreement_just_above_threshold": round(float((band["class_a"] == band["class_b"]).mean()), 3)
            if len(band) else None}


def model_run(cifar: Path, tmp: Path, size: int) -> dict:
    """The stages check → evaluate in a copy of the project: linear probe on the real weights."""
    project = bt.make_project(tmp / "project")
    bt.set_params(project, {"dataset": "folder", "data_dir": str(cifar), "model": bt.MODEL, "weights": str(bt.WEIGHTS),
                            "finetune": "linear_probe", "image_size": size, "augment.hflip": True})
    seconds = bt.stages(project, ["check", "download", "prepare", "train", "evaluate"])
    metrics = json.loads((project / "metrics/eval.json").read_text())
    keep = ("accuracy", "accuracy_clean", "accuracy_leaked", "test_images_clean", "test_images_leaked", "n_test")
    return {k: metrics.get(k) for k in keep} | {"stage_seconds": {k: round(v, 1) for k, v in seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.input_args(ap)
    ap.add_argument("--model", action="store_true", help="also train and evaluate one model (about 15 minutes)")
    ap.add_argument("--size", type=int, default=128, help="the model's image size (default %(default)s)")
    ap.add_argument("--threshold", type=float, default=None, help="data.duplicate_threshold (default: the pipeline's)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-duplicates")
    args = ap.parse_args()
    if args.threshold is None:
        from pipeline.core.params import DataParams
        args.threshold = DataParams().duplicate_threshold
    if not args.model:
        del args.weights  # only the archive is needed
    if not bt.use_inputs(args):
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cifar = bt.unpack(Path(tmp) / "cifar10")
        prepared = Path(tmp) / "prepared"
        proc = subprocess.run([sys.executable, "-c", FIND, str(cifar), str(prepared), str(args.threshold)], cwd=ROOT,
                              capture_output=True, text=True, env=bt.env())
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        result = {"prepare": json.loads(proc.stdout.strip().splitlines()[-1])}
        result["finder"] = finder_alone(prepared, args.threshold)
        result["planted_copies_found"] = planted(prepared, args.threshold)
        result["pairs"] = pictures(prepared, args.out, args.threshold)
        if args.model:
            result["model"] = model_run(cifar, Path(tmp), args.size)
    from pipeline.training.precision import cpu_name

    result["cpu"] = cpu_name()
    result["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"pictures: {args.out}/top_pairs.png, {args.out}/threshold_pairs.png")


if __name__ == "__main__":
    main()
