"""Stage `evaluate`: the checkpoint on the test split.

Reads params: its `params:` in dvc.yaml (what to compute and draw besides the metrics; the checkpoint
carries the preprocessing and the temperature). Reads: models/model.pt, data/prepared/,
metrics/train.json and metrics/train_history.csv (the learning curves),
metrics/oof_predictions.csv (label issues, when cross-validation ran). Writes, in metrics/:
eval.json (the metrics dict), per_class.csv, predictions.csv (actual,predicted per test image:
the `confusion` plots), confusion_matrix.json, eval_notes.json (what could not be drawn), and
the pictures confusion_matrix.png, misclassified.png, gradcam.png, learning_curves.png,
reliability.png, activations.png, filters.png, embedding.png, label_issues.png with
label_issues.csv. The report stage puts them in the report and the MLflow run.
Run: `dvc repro evaluate`."""
from pipeline.core.errors import run_cli
from pipeline.evaluation.run import OUTPUTS, run  # noqa: F401  (OUTPUTS: what dvc.yaml declares)
from pipeline.core.params import load_params


def main() -> dict:
    return run(load_params(stage="evaluate"))


if __name__ == "__main__":
    run_cli(main)
