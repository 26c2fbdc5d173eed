"""Stage `train`: train the model on the prepared splits; keep the best epoch on validation.

Reads params: PARAMS below. Reads: data/prepared/ (images and their preprocessing), the
weights file (data/resolved/weights.json holds its hash). Writes: models/model.pt
(self-describing checkpoint), models/mlflow_run.json (the MLflow run that evaluate and export
continue), metrics/train.json, metrics/train_history.csv, metrics/learning_curves.png,
metrics/augmented_samples.png; metrics/train_timing.json (seconds, images/s; not a DVC
output); checkpoints/last.pt after every epoch (resumed from when the stage is re-run with
the same params, data and code; deleted when training completes).
Run: `dvc repro train`."""
from pipeline.errors import run_cli
from pipeline.params import load_params
from pipeline.training.distributed import launch_torchrun, pick_device, process_group, under_torchrun
from pipeline.training.run import run

PARAMS = ("model", "epochs", "batch_size", "lr", "seed", "pretrained", "weights", "finetune", "augment", "train",
          "transfer", "mlflow.experiment")


def main() -> dict | None:
    params = load_params(keys=PARAMS)
    if params.train.nproc > 1 and not under_torchrun() and params.finetune != "linear_probe":
        launch_torchrun(params.train.nproc)  # a linear probe trains on cached features in seconds: one process
    with process_group(pick_device(params.train.device)) as (device, rank):
        return run(params, device, rank)


if __name__ == "__main__":
    run_cli(main)
