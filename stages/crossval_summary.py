"""Stage `crossval_summary`: the k folds' records into metrics/crossval.json (mean, std and
per-fold value of every metric: a DVC metric, so `dvc exp show` compares mean ± std across
experiments) and metrics/oof_predictions.csv (out-of-fold probabilities of every train+val
image); an MLflow parent run with one nested run per fold.

Reads params: PARAMS below. Reads: metrics/crossval/fold_*.json. Run: `dvc repro crossval_summary`."""
from pipeline.errors import run_cli
from pipeline.params import load_params

PARAMS = ("crossval", "mlflow.experiment")


def main() -> dict:
    from pipeline.crossval.summary import summarize

    return summarize(load_params(keys=PARAMS, check_models=False))


if __name__ == "__main__":
    run_cli(main)
