"""Prediction sets calibrated on the validation split that also chose the model: does that reuse
cost coverage, against a calibration split of their own carved out of it?

The train stage fits the temperature, picks the linear probe's L2 (or the best epoch) and
computes the conformal scores all on the validation split (`evaluate.conformal_alpha`). Choosing
on the same images the sets are calibrated on breaks the exchangeability the guarantee rests on;
halving the split instead doubles the spread of the coverage one calibration set gives. This
measures both on real photos and real weights, over many redraws of the calibration images:

  - features: `tf_efficientnet_lite0` on its ImageNet weights (--weights) at --size px, of
    --train + --val CIFAR-10 training photos and --test test photos (seeded picks);
  - the probe: scikit-learn LogisticRegression on the --train images, one per C in a grid;
  - each redraw takes --cal of the --val images, then
      reuse: C (by log loss), the temperature and the conformal threshold all from those images;
      split: C and the temperature from one half, the threshold from the other half;
    and scores the sets (APS, `pipeline.conformal`) on the test photos.
Printed per α: the mean coverage over the redraws, its standard deviation (what one calibration
set can give) and the share of redraws below the promise 1 − α.

Needs the CIFAR-10 JPEG archive (--archive) and the weights (--weights); skips with a message
where they are absent. CIFAR_DIR=<dir> reuses an unpacked archive.
Run: python benchmarks/bench_conformal_reuse.py [--size 128] [--cal 750] [--redraws 300]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.bench_transfer as bt  # noqa: E402

CS = (0.001, 0.01, 0.1, 1.0, 10.0)


def features(cifar: Path, size: int, n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    """Pooled features and labels of `n_train` training and `n_test` test photos (seeded picks)."""
    import timm
    import torch
    from PIL import Image

    torch.set_num_threads(os.cpu_count() or 1)
    model = timm.create_model(bt.MODEL, pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(bt.WEIGHTS, map_location="cpu"), strict=False)
    model.eval()
    mean, std = np.float32(model.pretrained_cfg["mean"]), np.float32(model.pretrained_cfg["std"])
    classes = sorted(p.name for p in (cifar / "train").iterdir())
    out = []
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        files = sorted((cifar / split).rglob("*.jpg"))
        pick = [files[i] for i in np.random.default_rng(seed).permutation(len(files))[:n]]
        feats = []
        for i in range(0, len(pick), 128):
            x = np.stack([(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC),
                                      np.float32) / 255 - mean) / std for f in pick[i:i + 128]])
            with torch.no_grad():
                feats.append(model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy())
        out += [np.concatenate(feats), np.array([classes.index(f.parent.name) for f in pick])]
    return tuple(out)


def redraws(logits_val: dict, y_val: np.ndarray, logits_test: dict, y_test: np.ndarray, alpha: float,
            n_cal: int, n_redraws: int) -> dict[str, np.ndarray]:
    """Test coverage of each redraw's sets, for `reuse` and `split` (see the module's docstring)."""
    from scipy.special import softmax
    from sklearn.metrics import log_loss

    from pipeline.calibration import fit_temperature
    from pipeline.conformal import aps_scores, prediction_sets, threshold

    def fit(choose, calibrate):
        c = min(CS, key=lambda c: log_loss(y_val[choose], softmax(logits_val[c][choose], 1),
                                           labels=range(logits_val[c].shape[1])))
        t, _ = fit_temperature(logits_val[c][choose], y_val[choose])
        q = threshold(np.array(aps_scores(softmax(logits_val[c][calibrate] / t, 1), y_val[calibrate])), alpha)
        sets = prediction_sets(softmax(logits_test[c] / t, 1), q)
        return sets[np.arange(len(y_test)), y_test].mean()

    rng, cover = np.random.default_rng(0), {"reuse": [], "split": []}
    for _ in range(n_redraws):
        cal = rng.permutation(len(y_val))[:n_cal]
        cover["reuse"].append(fit(cal, cal))
        cover["split"].append(fit(cal[:n_cal // 2], cal[n_cal // 2:]))
    return {k: np.array(v) for k, v in cover.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bt.input_args(ap)
    ap.add_argument("--size", type=int, default=128, help="image size (default %(default)s)")
    ap.add_argument("--train", type=int, default=5000, help="photos the probe trains on (default %(default)s)")
    ap.add_argument("--val", type=int, default=4000, help="photos the calibration sets are drawn from (default %(default)s)")
    ap.add_argument("--test", type=int, default=4000, help="test photos (default %(default)s)")
    ap.add_argument("--cal", type=int, default=750, help="validation images per redraw (default %(default)s, "
                    "as bench_conformal's validation split)")
    ap.add_argument("--redraws", type=int, default=300, help="redraws of the calibration images (default %(default)s)")
    args = ap.parse_args()
    if not bt.use_inputs(args):
        return
    from sklearn.linear_model import LogisticRegression

    with bt.workspace("bench-reuse-") as (_, cifar):
        f, y, f_test, y_test = features(cifar, args.size, args.train + args.val, args.test)
    probes = {c: LogisticRegression(C=c, max_iter=3000).fit(f[:args.train], y[:args.train]) for c in CS}
    val = {c: p.decision_function(f[args.train:]) for c, p in probes.items()}
    test = {c: p.decision_function(f_test) for c, p in probes.items()}
    print(f"{args.cal} calibration images per redraw, {args.redraws} redraws, {len(y_test)} test photos, "
          f"probe test accuracy (C=1) {probes[1.0].score(f_test, y_test):.4f}\n")
    print("| α | calibration | mean coverage | sd over redraws | redraws below 1 − α |\n|---|---|---|---|---|")
    for alpha in (0.1, 0.05):
        for arm, cov in redraws(val, y[args.train:], test, y_test, alpha, args.cal, args.redraws).items():
            what = "reuse: C, T, sets on the same images" if arm == "reuse" else "split: C, T on half, sets on half"
            print(f"| {alpha:g} | {what} | {cov.mean():.4f} | {cov.std():.4f} | {(cov < 1 - alpha).mean():.0%} |")


if __name__ == "__main__":
    main()
