"""k-fold cross-validation of the configured model (`crossval.folds: k`, 0 = off).

The train and val splits are pooled and cut into k stratified folds (seeded by `seed`); fold f
trains the configured model (the train stage's own setup and loop: weights, strategy, recipe,
augmentation, lr) on the other k-1 folds and scores the held-out fold with the evaluate
stage's metrics. The test split is never read. The held-out fold is also what picks the best
epoch, exactly as the val split does in the train stage: the k scores are k validation scores
(the seed notes' "average the k validation scores"), not test scores.

Each fold is a DVC stage of its own (`crossval@0` … `crossval@9`, dvc.yaml's matrix of
MAX_FOLDS), so folds are cached one by one (DVC runs a workspace's stages in sequence;
queued experiments run in parallel); a fold stage beyond k writes a one-line "unused" record in a fraction of a
second. `crossval_summary` writes metrics/crossval.json (mean, std and per-fold value of every
metric), metrics/oof_predictions.csv (every train+val image's out-of-fold probabilities), and
an MLflow parent run with one nested run per fold.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.params import MAX_FOLDS

SPLITS = ("train", "val")  # pooled; "test" is never read here


def fold_file(fold: int) -> Path:
    return paths.CROSSVAL_DIR / f"fold_{fold}.json"


def fold_files() -> list[Path]:
    return [fold_file(f) for f in range(MAX_FOLDS)]


