"""Every path the pipeline reads or writes, defined once.

Paths are relative to the working directory, which DVC sets to the repository root (also in
the temporary copies that `dvc exp run --queue/--temp` use). dvc.yaml names the same files:
tests/test_dvc_yaml.py, tests/test_evaluate.py and tests/test_crossval.py check that the stages'
outputs agree with it.
"""
from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")

RAW_DIR = Path("data/raw")
RESOLVED_DIR = Path("data/resolved")              # written by the check stage
RESOLVED_PREPROCESSING = RESOLVED_DIR / "preprocessing.json"  # what the weights bring, or the data's own
RESOLVED_WEIGHTS = RESOLVED_DIR / "weights"  # a link to the weights file (a line saying none): DVC re-runs train when its bytes change
PREPARED_DIR = Path("data/prepared")
PREPARED_META = PREPARED_DIR / "meta.json"
MANIFEST = PREPARED_DIR / "manifest.csv"
DUPLICATES = PREPARED_DIR / "duplicates.csv"  # every pair of exact or near-duplicate images

MODELS_DIR = Path("models")
CHECKPOINT = MODELS_DIR / "model.pt"
MLFLOW_RUN = MODELS_DIR / "mlflow_run.json"  # this execution's MLflow run (not a DVC output: a new id each run)
PUBLISHED = MODELS_DIR / "report.json"  # the report stage's record of what it published (DVC-cached, not in git)
ONNX_MODEL = MODELS_DIR / "model.onnx"
INT8_DIR = MODELS_DIR / "int8"  # export.int8: the INT8 model and its card (else a note)
ONNX_META = MODELS_DIR / "model.json"  # classes and preprocessing beside the ONNX model
ENSEMBLE_ONNX = MODELS_DIR / "ensemble.onnx"  # `pipeline ensemble`: members and weighted average in one graph
RESUME_CHECKPOINT = Path("checkpoints/last.pt")
CROSSVAL_RECORDS = Path("checkpoints/crossval")  # fold_<f>.json: each finished fold, kept until train completes

METRICS_DIR = Path("metrics")
AUGMENTED_SAMPLES_PNG = METRICS_DIR / "augmented_samples.png"
LR_FIND_PNG = METRICS_DIR / "lr_find.png"
DATA_CARD = METRICS_DIR / "data_card.json"
DATA_CARD_MD = METRICS_DIR / "data_card.md"
DATA_CARD_PNG = METRICS_DIR / "data_card_duplicates.png"  # duplicate pairs side by side
TRAIN_METRICS = METRICS_DIR / "train.json"
TRAIN_HISTORY = METRICS_DIR / "train_history.csv"
TRAIN_TIMING = METRICS_DIR / "train_timing.json"  # seconds and images/s: differ run to run, so not a DVC output
LEARNING_CURVES_PNG = METRICS_DIR / "learning_curves.png"
EVAL_METRICS = METRICS_DIR / "eval.json"
PER_CLASS = METRICS_DIR / "per_class.csv"
PREDICTIONS = METRICS_DIR / "predictions.csv"
CONFUSION_JSON = METRICS_DIR / "confusion_matrix.json"
CONFUSION_PNG = METRICS_DIR / "confusion_matrix.png"
MISCLASSIFIED_PNG = METRICS_DIR / "misclassified.png"
PR_CURVES_PNG = METRICS_DIR / "pr_curves.png"           # task=multilabel: precision-recall per label
PREDICTION_SETS_PNG = METRICS_DIR / "prediction_sets.png"  # conformal sets, coverage, abstention
GRADCAM_PNG = METRICS_DIR / "gradcam.png"
RELIABILITY_PNG = METRICS_DIR / "reliability.png"    # calibration before and after temperature scaling
ACTIVATIONS_PNG = METRICS_DIR / "activations.png"    # inner feature maps, a test image per class
FILTERS_PNG = METRICS_DIR / "filters.png"            # first-layer filters, inputs maximising deeper channels
EMBEDDING_PNG = METRICS_DIR / "embedding.png"        # penultimate features of the test split in 2-D
LABEL_ISSUES = METRICS_DIR / "label_issues.csv"      # images whose given label the model doubts (cleanlab)
LABEL_ISSUES_PNG = METRICS_DIR / "label_issues.png"
EVAL_NOTES = METRICS_DIR / "eval_notes.json"  # what evaluate could not draw, or was switched off: the report's notes
EVAL_REPORT_MD = METRICS_DIR / "report.md"
EVAL_REPORT_HTML = METRICS_DIR / "report.html"  # the same report, pictures inlined: one file to send
EXPORT_METRICS = METRICS_DIR / "export.json"
EXPORT_TIMING = METRICS_DIR / "export_timing.json"  # batch-1 latencies: differ run to run, so not a DVC output
CROSSVAL_METRICS = METRICS_DIR / "crossval.json"   # mean, std and per-fold value of every metric
OOF_PREDICTIONS = METRICS_DIR / "oof_predictions.csv"  # out-of-fold probabilities of every train+val image
ENSEMBLE_METRICS = METRICS_DIR / "ensemble.json"   # `pipeline ensemble`: the ensemble's and each member's figures
TUNE_RESULTS = METRICS_DIR / "tune.json"          # `pipeline tune`: best params and value, every trial
TUNE_HISTORY_PNG = METRICS_DIR / "tune_history.png"
TUNE_IMPORTANCE_PNG = METRICS_DIR / "tune_importance.png"


# The default MLflow store, relative to the repository root (`repo_root()`), not the working
# directory: a queued experiment runs in a temporary copy that DVC deletes afterwards.
MLFLOW_DB = Path("mlflow.db")
MLFLOW_ARTIFACTS = Path("mlartifacts")


def repo_root() -> Path:
    """The main repository: `DVC_ROOT` when DVC runs us (it points at the main repo even from
    the temporary copy of a queued experiment), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
