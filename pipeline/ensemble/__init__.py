"""Weighted ensembles: `pipeline ensemble MEMBER... [--weights auto|w1,w2,...] [--out models/ensemble.onnx]`.

A MEMBER is a DVC experiment name (as `dvc exp list --all-commits` names it) or one of our
checkpoints (models/model.pt or a copy). The ensemble averages the members' calibrated
probabilities softmax(logits / T) with weights that are given, or fitted on the validation
split (least log loss); it is scored on the test split with the evaluate stage's metrics
(metrics/ensemble.json) and exported as one ONNX model that `pipeline predict` runs.
"""
from pipeline.ensemble.run import ENSEMBLE_METRICS, ENSEMBLE_ONNX, EnsembleResult, run

__all__ = ["ENSEMBLE_METRICS", "ENSEMBLE_ONNX", "EnsembleResult", "run"]
