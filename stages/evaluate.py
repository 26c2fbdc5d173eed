"""Stage `evaluate`: the checkpoint on the test split.

Reads: models/model.pt, models/mlflow_run.json, data/prepared/ (no params: the checkpoint
carries its preprocessing); metrics/train.json and the train/prepare pictures when present
(for the report). Writes, in metrics/: eval.json (the metrics dict, also logged to MLflow as
test_*), per_class.csv, predictions.csv (actual,predicted per test image: the `confusion`
plots), confusion_matrix.json (counts and row-normalised), confusion_matrix.png,
misclassified.png, gradcam.png, report.md; all of them are logged to the MLflow run that
train started. Run: `dvc repro evaluate`."""
from pipeline.errors import run_cli
from pipeline.evaluation.run import OUTPUTS, run  # noqa: F401  (OUTPUTS: what dvc.yaml declares)

PARAMS: tuple[str, ...] = ()  # none: the checkpoint carries what evaluation needs


def main() -> dict:
    return run()


if __name__ == "__main__":
    run_cli(main)
