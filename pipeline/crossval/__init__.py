"""k-fold cross-validation of the configured model (`crossval.folds: k`, 0 = off), run by the
train stage before it trains the model itself.

The train and val splits are pooled and cut into k stratified folds (seeded by
`data.split_seed`, like the split itself); fold f trains the configured model (the train stage's
own setup and loop: weights, strategy, recipe, augmentation, lr) on the other k-1 folds and
scores the held-out fold with the evaluate stage's metrics. The test split is never read. The
held-out fold is also what picks the best epoch, exactly as the val split does in the train
stage: the k scores are k validation scores, not test scores.

Each finished fold leaves a record in checkpoints/crossval/ (with the train stage's
fingerprint), so an interrupted stage re-runs only the folds it had not finished; the records go
when the stage completes. The train stage then writes metrics/crossval.json (mean, std and
per-fold value of every metric: a DVC metric) and metrics/oof_predictions.csv (every train+val
image's out-of-fold probabilities), and logs one nested MLflow run per fold under its own run.
With k = 0 nothing runs: crossval.json says `{"folds": 0}` and the out-of-fold file is empty.
(Folds are part of the train stage rather than stages of their own so that, with
cross-validation off, no fold stage exists to be listed or run: DVC makes stages from lists, not
from a number.)
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core import paths

SPLITS = ("train", "val")  # pooled; "test" is never read here


def fold_file(fold: int, records: Path = paths.CROSSVAL_RECORDS) -> Path:
    return records / f"fold_{fold}.json"
