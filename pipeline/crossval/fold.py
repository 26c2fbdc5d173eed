"""The folds of cross-validation: pool train+val, cut stratified folds, train on all but one
with the train stage's setup and loop, score the held-out one with the evaluate stage's metrics."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import read_json, write_json
from pipeline.crossval import SPLITS, fold_file


def assignments(y: np.ndarray, k: int, seed: int, classes: list[str], groups: np.ndarray | None = None) -> np.ndarray:
    """The fold (0..k-1) of every pooled image: stratified (each fold has every class in
    proportion), seeded; each group (near-duplicates, data.group_by) in one fold."""
    from pipeline.data.groups import fold_assignments

    from pipeline.data.prepare import label_counts

    counts = label_counts(y, len(classes))  # images per class, or positives per label
    if (small := np.flatnonzero((counts > 0) & (counts < k))).size:
        what = "label" if y.ndim == 2 else "class"
        raise UserError(f"crossval.folds={k}: {what} {classes[small[0]]!r} has only {counts[small[0]]} train+val "
                        f"images; use fewer folds (each fold needs one image of every {what})")
    return fold_assignments(y, groups, k, seed)


def pooled(prepared: Path = paths.PREPARED_DIR) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]], np.ndarray]:
    """The train and val images, labels and groups, one after the other, and where each came from."""
    from pipeline.prepared import load_groups, load_split

    parts = [load_split(split, prepared) for split in SPLITS]
    origin = [(split, i) for split, (_, y) in zip(SPLITS, parts) for i in range(len(y))]
    groups = np.concatenate([load_groups(split, prepared) for split in SPLITS])
    return np.concatenate([np.asarray(x) for x, _ in parts]), np.concatenate([y for _, y in parts]), origin, groups


def finished(fold: int, k: int, fingerprint: str, records: Path = paths.CROSSVAL_RECORDS) -> dict | None:
    """The record of `fold` when an earlier, interrupted run of the same training finished it."""
    path = fold_file(fold, records)
    record = read_json(path) if path.exists() else {}
    return record if record.get("folds") == k and record.get("fingerprint") == fingerprint else None


def run_folds(params, device: str, records: Path = paths.CROSSVAL_RECORDS) -> list[dict]:
    """Every fold of `crossval.folds` (none when 0), each skipped when a record of it with this
    training's fingerprint exists; returns the k records."""
    k = params.crossval.folds
    if not k:
        return []
    from pipeline.training.run import setup

    s = setup(params, device)
    x, y, origin, groups = pooled()
    folds = assignments(y, k, params.data.split_seed, s.classes, groups)
    out = []
    for fold in range(k):
        if (record := finished(fold, k, s.cfg.fingerprint, records)) is not None:
            print(f"crossval: fold {fold + 1} of {k} finished earlier: kept", flush=True)
        else:
            record = run_fold(params, fold, device, (x, y, origin, folds))
            record["fingerprint"] = s.cfg.fingerprint
            records.mkdir(parents=True, exist_ok=True)
            write_json(fold_file(fold, records), record)
        out.append(record)
    return out


def run_fold(params, fold: int, device: str, data: tuple) -> dict:
    """Train on every fold but `fold`, score `fold`; return its record."""
    from pipeline.checkpoint import predict_logits
    from pipeline.evaluation.metrics import evaluation_metrics
    from pipeline.probabilities import softmax
    from pipeline.training.run import fit_arrays, setup

    x, y, origin, folds = data
    k = params.crossval.folds
    s = setup(params, device)  # a fresh model for every fold, seeded the same way
    s = dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, resume_path=None))
    train, held = folds != fold, folds == fold
    print(f"crossval: fold {fold + 1} of {k}: {params.model} trains on {train.sum()} images, "
          f"scores {held.sum()} held out (test split untouched)", flush=True)
    result = fit_arrays(s, (x[train], y[train]), (x[held], y[held]))
    s.model.load_state_dict(result.best_state)
    logits = predict_logits(s.model, x[held], s.prep)
    if s.cfg.multilabel:  # mAP needs no threshold; F1 and the like at 0.5 (thresholds are chosen by the final model)
        from pipeline.evaluation.multilabel import multilabel_metrics
        from pipeline.probabilities import sigmoid

        probs = sigmoid(logits)
        metrics, _ = multilabel_metrics(y[held], probs, np.full(len(s.classes), 0.5), s.classes)
    else:
        probs = softmax(logits)
        metrics, _, _ = evaluation_metrics(y[held], probs, s.classes)
    shown = ("map_macro", "log_loss") if s.cfg.multilabel else ("accuracy", "log_loss")
    print(f"crossval: fold {fold + 1} of {k}: " + ", ".join(f"{m}={metrics[m]:.4f}" for m in shown))
    return {"fold": fold, "folds": k, "classes": s.classes, "metrics": metrics,
            "best_epoch": result.best_epoch, "n_train": int(train.sum()), "n_held_out": int(held.sum()),
            "history": result.history.drop(columns=["images_per_second"]).to_dict(orient="records"),
            "oof": {"split": [origin[i][0] for i in np.flatnonzero(held)],
                    "index": [origin[i][1] for i in np.flatnonzero(held)],
                    "label": y[held].tolist(), "probs": np.round(probs, 6).tolist()}}
