"""Stage `crossval@F` (F = 0 … 9): fold F of k-fold cross-validation (`crossval.folds: k`).

Reads params: PARAMS below. Reads: data/prepared/ (the train and val splits, pooled; never
the test split), the weights file. Writes: metrics/crossval/fold_F.json (held-out metrics,
best epoch, history, out-of-fold probabilities; for F ≥ k a one-line "unused" record).
Run: `dvc repro crossval_summary` (every fold, one after another), `dvc repro crossval@2` (one)."""
import sys

from pipeline.errors import UserError, run_cli
from pipeline.params import MAX_FOLDS, load_params

PARAMS = ("model", "epochs", "batch_size", "lr", "seed", "pretrained", "weights", "finetune", "augment", "train",
          "transfer", "crossval")


def main(fold: int) -> dict:
    from pipeline.crossval.fold import run_fold

    params = load_params(keys=PARAMS, check_models=False)
    if fold >= params.crossval.folds:
        return run_fold(params, fold, "cpu")  # unused: a record in a fraction of a second (no torch)
    from pipeline.training.distributed import pick_device

    params = load_params(keys=PARAMS)
    return run_fold(params, fold, pick_device(params.train.device))


def fold_argument(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit() or int(argv[0]) >= MAX_FOLDS:
        raise UserError(f"usage: python -m stages.crossval FOLD (0 … {MAX_FOLDS - 1})")
    return int(argv[0])


if __name__ == "__main__":
    run_cli(lambda: main(fold_argument(sys.argv[1:])))
