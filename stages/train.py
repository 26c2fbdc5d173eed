"""Stage `train`: train the model on the prepared splits; keep the best epoch on validation.
With `crossval.folds` k > 0, k-fold cross-validation of the same recipe runs first.

Reads params: its `params:` in dvc.yaml. Reads: data/prepared/ (images and their preprocessing), the
weights file (through data/resolved/weights, the check stage's link to it). Writes:
models/model.pt (self-describing checkpoint), metrics/train.json, metrics/train_history.csv,
metrics/augmented_samples.png, metrics/crossval.json and metrics/oof_predictions.csv (empty with
cross-validation off); not DVC outputs: models/mlflow_run.json (this execution's MLflow run,
which the report stage completes), metrics/train_timing.json (seconds, images/s),
checkpoints/last.pt and checkpoints/crossval/ (resumed from when the stage is re-run with the
same params, data and code; deleted when training completes).
Run: `dvc repro train`."""
from pipeline.core.errors import run_cli
from pipeline.core.params import load_params
from pipeline.training.distributed import die_with_torchrun, launch_torchrun, pick_device, process_group, under_torchrun
from pipeline.training.run import run
from pipeline.training.strategy import Strategy


def main() -> dict | None:
    if under_torchrun():
        die_with_torchrun()  # a DDP worker: nothing of it survives torchrun or this stage
    params = load_params(stage="train")
    if not under_torchrun():
        from pipeline.crossval.fold import run_folds

        run_folds(params, pick_device(params.train.device))  # nothing with crossval.folds: 0
    if params.train.nproc > 1 and not under_torchrun() and Strategy.resolve(params).parallel:
        launch_torchrun(params.train.nproc)  # a linear probe trains on cached features in seconds: one process
    with process_group(pick_device(params.train.device)) as (device, rank):
        return run(params, device, rank)


if __name__ == "__main__":
    run_cli(main)
