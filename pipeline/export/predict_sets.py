"""`pipeline predict` with a multi-label model (task=multilabel): each image's label set, the
labels whose probability is at least the threshold chosen for it on the validation split (the
checkpoint or the ONNX model card carries them), with `--top-k` the k most probable labels and
their scores beside it; `--json` and `--out` carry the sets."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.export.predict import PATH_WIDTH, Predictor, predict_probabilities, progress_bar, say


def label_set(predictor: Predictor, p: np.ndarray) -> list[tuple[str, float]]:
    """(label, probability) of every label at or over its threshold, most probable first."""
    said = np.flatnonzero(p >= predictor.thresholds)
    return [(predictor.classes[i], float(p[i])) for i in said[np.argsort(-p[said], kind="stable")]]


def scores(predictor: Predictor, p: np.ndarray, k: int) -> list[dict]:
    order = np.argsort(-p, kind="stable")[:k]
    return [{"label": predictor.classes[i], "probability": float(p[i]), "threshold": float(predictor.thresholds[i])}
            for i in order]


def display(predictor: Predictor, path: Path, p: np.ndarray, k: int | None, as_json: bool, several: bool) -> str:
    """One image: a JSON line, one line of several images, or its own table of the top labels."""
    chosen = label_set(predictor, p)
    if as_json:
        return json.dumps({"image": str(path), "labels": [c for c, _ in chosen],
                           "scores": scores(predictor, p, k or len(predictor.classes))})
    names = ", ".join(f"{c} {q:.2f}" for c, q in chosen) or "(none over its threshold)"
    if several:
        extra = "" if not k else "  top: " + "  ".join(f"{s['label']} {s['probability']:.2f}" for s in scores(predictor, p, k))
        return f"{str(path):<{PATH_WIDTH}}  {names}{extra}".rstrip()
    rows = scores(predictor, p, k or len(predictor.classes))
    width = max(5, *(len(r["label"]) for r in rows))
    lines = [f"{path}: {names}", f"  {'label':<{width}}  probability  threshold"]
    lines += [f"  {r['label']:<{width}}  {r['probability']:11.4f}  {r['threshold']:9.4f}"
              + ("  ✓" if r["probability"] >= r["threshold"] else "") for r in rows]
    return "\n".join(lines)


def summary(predictor: Predictor, sets: list[np.ndarray], failed: int, model: Path, seconds: float) -> str:
    """Per label the images given it and their mean probability; then the counts."""
    lines = []
    if sets:
        probs = np.stack(sets)
        said = probs >= predictor.thresholds
        width = max(5, *map(len, predictor.classes))
        lines.append(f"{'label':<{width}}  images  mean prob")
        for c, name in enumerate(predictor.classes):
            mean = f"{probs[said[:, c], c].mean():9.3f}" if said[:, c].any() else f"{'-':>9}"
            lines.append(f"{name:<{width}}  {int(said[:, c].sum()):>6}  {mean}")
        lines.append(f"labels per image: {said.sum(axis=1).mean():.2f} (none: {int((said.sum(axis=1) == 0).sum())})")
    lines.append(f"{len(sets) + failed} images: {len(sets)} predicted, {failed} failed{' (on stderr)' if failed else ''}; "
                 f"model {model}, {seconds:.1f} s")
    return "\n".join(lines)


def write_csv(out: Path, predictor: Predictor, results: list[tuple[Path, np.ndarray | None, str]]) -> None:
    """One row per image: image, labels (joined by ';'), error, p_<label>..."""
    import pandas as pd

    from pipeline.core.io import atomic_path

    rows = [{"image": str(f), "labels": "" if p is None else ";".join(c for c, _ in label_set(predictor, p)),
             "error": reason} for f, p, reason in results]
    probs = np.stack([np.full(len(predictor.classes), np.nan) if p is None else p for _, p, _ in results])
    frame = pd.concat([pd.DataFrame(rows), pd.DataFrame(probs, columns=[f"p_{c}" for c in predictor.classes])], axis=1)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)


def run(predictor: Predictor, model: Path, files: list[Path], images: list[Path], k: int | None, as_json: bool,
        max_pixels: int | None, tta: str, out: Path | None, started: float) -> int:
    several = len(files) > 1 or any(p.is_dir() for p in images)
    k = min(k, len(predictor.classes)) if k else None
    sets, results, failed = [], [], 0
    with progress_bar(len(files), several) as bar:
        for path, p, reason in predict_probabilities(predictor, files, max_pixels, tta, bar and bar.update):
            results += [(path, p, reason)] if out else []
            if p is None:
                failed += 1
                sys.stdout.flush()
                say(f"error: {path}: {reason}", bar, sys.stderr)
                continue
            sets.append(p)
            say(display(predictor, path, p, k, as_json, several), bar)
    if several and not as_json:
        print("\n" + summary(predictor, sets, failed, model, time.perf_counter() - started))
    if out:
        write_csv(out, predictor, results)
        print(f"predict: wrote {out} ({len(results)} rows, one per image)", file=sys.stderr)
    return failed
