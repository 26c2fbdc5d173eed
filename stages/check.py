"""Stage `check`: validate params.yaml and resolve what the weights bring, before any other
stage touches its outputs.

DVC removes a stage's outputs before it runs the stage's command, so a mistake found by the
stage itself comes too late. This stage runs first on every `dvc repro`/`dvc exp run`
(`always_changed`), reads nothing else and writes only when everything is valid (its outputs
are `persist`: DVC never removes them), so a bad value stops the pipeline here with one line.

Reads params: all of params.yaml; the weights file (our checkpoint's recorded preprocessing);
data_dir (dataset=folder: that it exists). Writes data/resolved/preprocessing.json (the
preprocessing the weights bring, or the data set's own: prepare depends on it) and
data/resolved/weights.json (the weights file's sha256: train re-runs when its bytes change).
Run: `dvc repro check`."""
from pipeline.check import check
from pipeline.errors import run_cli
from pipeline.params import load_params

PARAMS = ("dataset", "data_dir", "model", "epochs", "batch_size", "lr", "image_size", "seed", "pretrained", "weights",
          "finetune", "data", "augment", "train", "transfer", "mlflow", "evaluate", "plots", "crossval", "tune")


def main() -> dict:
    return check(load_params(keys=PARAMS))


if __name__ == "__main__":
    run_cli(main)
