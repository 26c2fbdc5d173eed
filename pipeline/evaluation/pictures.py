"""The evaluate stage's optional pictures, each switched in params.yaml (`evaluate.*`,
`plots.smoothing`) and each a declared DVC output that always exists: switched off, it is a
note saying how to switch it on. Learning curves (from train's history), the reliability
diagram, what the network computes (activations, filters, embedding: pipeline.evaluation.inside)
and the images whose labels the model doubts (pipeline.evaluation.label_issues)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.calibration import scaled
from pipeline.checkpoint import predict_logits
from pipeline.core import paths
from pipeline.core.io import read_json
from pipeline.evaluation.figures import reliability_diagram
from pipeline.evaluation.metrics import ECE_BINS, softmax
from pipeline.plots import learning_curves, note_figure
from pipeline.prepared import load_split


def training_curves(smoothing: float) -> str | None:
    """metrics/learning_curves.png from train's history (drawn here, so changing
    `plots.smoothing` redraws without retraining)."""
    if not paths.TRAIN_HISTORY.exists():
        note = "no metrics/train_history.csv here: no learning curves"
        note_figure(note, paths.LEARNING_CURVES_PNG)
        return note
    history = pd.read_csv(paths.TRAIN_HISTORY)
    best = read_json(paths.TRAIN_METRICS)["best_epoch"] if paths.TRAIN_METRICS.exists() else int(history["epoch"].iloc[-1])
    learning_curves(history, best, paths.LEARNING_CURVES_PNG, smoothing)
    return None


def reliability(y: np.ndarray, probs: np.ndarray, probs_cal: np.ndarray, metrics: dict) -> None:
    t = metrics["temperature"]
    panels = [("before calibration (T = 1)", probs, metrics["ece"])]
    if t != 1.0:
        panels.append((f"after temperature scaling (T = {t:g})", probs_cal, metrics["ece_calibrated"]))
    reliability_diagram(y, panels, paths.RELIABILITY_PNG, ECE_BINS)


def _off(path: Path, key: str) -> str:
    note = f"switched off: evaluate.{key}: false (dvc exp run -S evaluate.{key}=true draws it)"
    note_figure(note, path)
    return note


INSIDE = ("activations", "filters", "embedding")


def inside(model, x: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str], prep, switches,
           features: np.ndarray | None = None, parts: tuple[str, ...] = INSIDE) -> list[str]:
    """activations.png, filters.png and embedding.png (those of `parts`), or notes why not; the
    notes. `features`: the test images' penultimate features where the scoring pass caught them."""
    from pipeline.evaluation import inside as draw

    pictures = {"activations": (paths.ACTIVATIONS_PNG, lambda: draw.activations_figure(
                    model, x, y, classes, prep, paths.ACTIVATIONS_PNG)),
                "filters": (paths.FILTERS_PNG, lambda: draw.filters_figure(model, prep, paths.FILTERS_PNG)),
                "embedding": (paths.EMBEDDING_PNG, lambda: draw.embedding_figure(
                    model, x, y, probs, classes, prep, paths.EMBEDDING_PNG, features=features))}
    notes = [drawn() if getattr(switches, part) else _off(path, part)
             for part in parts for path, drawn in [pictures[part]]]
    return [n for n in notes if n]


def label_issues(model, prep, classes: list[str], temperature: float, on: bool,
                 val_logits: np.ndarray | None = None) -> str:
    """metrics/label_issues.csv and .png: cleanlab on the out-of-fold probabilities of
    cross-validation when it ran (every train+val image, each scored by a model that never saw
    it), else on this model's calibrated probabilities of the validation split (which chose
    the best epoch, so slightly optimistic): from `val_logits` (the checkpoint's) where given,
    else the model scores the split. Returns one line saying what was checked."""
    from pipeline.evaluation import label_issues as li

    if not on:
        off = "switched off (evaluate.label_issues: false)"
        table = li.find_label_issues(pd.DataFrame({"split": [], "index": []}), np.zeros(0, int),
                                     np.zeros((0, len(classes))), classes, off)
        li.write_label_issues(table, paths.LABEL_ISSUES, off, 0)
        return _off(paths.LABEL_ISSUES_PNG, "label_issues")
    oof = li.oof_probabilities(paths.OOF_PREDICTIONS, classes)
    if oof is not None:
        ids, labels, probs = oof
        source = f"out-of-fold probabilities of {paths.OOF_PREDICTIONS} (cross-validation, train+val)"
    else:
        x, labels = load_split("val")
        logits = val_logits if val_logits is not None else predict_logits(model, x, prep)
        probs = softmax(scaled(logits, temperature))
        ids = pd.DataFrame({"split": "val", "index": np.arange(len(labels))})
        source = "validation split, probabilities of models/model.pt (crossval.folds: 0)"
    table = li.find_label_issues(ids, labels, probs, classes, source)
    li.write_label_issues(table, paths.LABEL_ISSUES, source, len(labels))
    li.suspects_figure(_crops(table, prep), table, classes, paths.LABEL_ISSUES_PNG)
    why = f" ({table.attrs['reason']})" if table.attrs.get("reason") else ""
    return f"label issues: {len(table)} of {len(labels):,} images suspected{why}, from the {source}"


def _crops(table: pd.DataFrame, prep, n: int = 24) -> np.ndarray:
    """The display crops of the table's first `n` images, from their prepared splits."""
    rows = table.head(n)
    splits = {s: load_split(s)[0] for s in rows["split"].unique()}
    images = [splits[s][int(i)] for s, i in zip(rows["split"], rows["index"])]
    if not images:
        return np.zeros((0, 3, prep.image_size, prep.image_size), dtype=np.uint8)
    return np.asarray(prep.center_crop(np.stack(images)))
