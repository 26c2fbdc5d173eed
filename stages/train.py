"""Stage `train`: train the model on the prepared splits; keep the best epoch on validation.

Reads params: model, epochs, batch_size, lr, seed, augment, train, mlflow. Reads: data/prepared/.
Writes: models/model.pt (self-describing checkpoint), models/mlflow_run.json (the MLflow run
that evaluate and export continue), metrics/train.json, metrics/train_history.csv,
metrics/learning_curves.png; checkpoints/last.pt after every epoch (resumed from when the
stage is re-run with the same params, data and code; deleted when training completes).
Run: `dvc repro train`."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import pipeline
from pipeline import paths, tracking
from pipeline.augment import AugmentConfig
from pipeline.checkpoint import save_checkpoint
from pipeline.data import load_meta, load_split
from pipeline.errors import UserError, run_cli
from pipeline.io import atomic_path, write_json
from pipeline.transfer import build_transfer_model
from pipeline.params import Params, load_params
from pipeline.plots import learning_curves
from pipeline.recipe import Recipe
from pipeline.train import TrainConfig, pick_device, resolve_class_weights, seed_everything, train

RECIPE_KEYS = set(Recipe.__dataclass_fields__)
CODE = ("train.py", "recipe.py", "augment.py", "models.py")  # code whose change invalidates a resume checkpoint


def files_hash(files) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def fingerprint(params: Params, data_hash: str) -> str:
    """What makes a training run: params (less logging-only keys), data and training code."""
    relevant = params.model_dump(exclude={"mlflow": True, "train": {"num_threads"}})
    code = files_hash(Path(pipeline.__file__).parent / name for name in CODE)
    return hashlib.sha256(json.dumps([relevant, data_hash, code], sort_keys=True).encode()).hexdigest()[:16]


def arch_kwargs_for(params: Params, num_classes: int) -> dict:
    kwargs = {"num_classes": num_classes, "in_chans": 3}
    if params.train.dropout is not None:
        kwargs["drop_rate"] = params.train.dropout
    if params.train.drop_path:
        kwargs["drop_path_rate"] = params.train.drop_path
    return kwargs


def launch_torchrun(nproc: int) -> None:
    """Re-run this stage as `nproc` DDP processes on this machine (torchrun --standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages.train"]
    print(f"train: launching {' '.join(cmd[1:])}", flush=True)
    sys.exit(subprocess.run(cmd).returncode)


def main() -> dict | None:
    params = load_params()
    if params.train.nproc > 1 and "LOCAL_RANK" not in os.environ:
        launch_torchrun(params.train.nproc)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(params.train.device)
    if world > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return _train(params, device, rank)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _train(params: Params, device: str, rank: int) -> dict | None:
    meta = load_meta(paths.PREPARED_DIR)
    mean, std, classes = meta["mean"], meta["std"], meta["classes"]
    arch_kwargs = arch_kwargs_for(params, len(classes))
    seed_everything(params.seed)  # the initial weights depend on the seed too
    try:
        model, pretrained_prep = build_transfer_model(params.model, len(classes), params.pretrained, params.weights,
                                                      {k: v for k, v in arch_kwargs.items() if k != "num_classes"})
    except TypeError as exc:  # e.g. drop_path_rate for a model without stochastic depth
        raise UserError(f"model={params.model!r} does not take these options: {exc}; "
                        "set train.drop_path: 0 (or train.dropout: null) for this model") from None
    if pretrained_prep:  # pretrained weights expect their own normalisation
        mean, std = pretrained_prep["mean"], pretrained_prep["std"]
    n_params = sum(p.numel() for p in model.parameters())
    train_xy = load_split("train", paths.PREPARED_DIR)
    t = params.train
    data_hash = files_hash(sorted(paths.PREPARED_DIR.iterdir()))
    cfg = TrainConfig(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr, seed=params.seed,
                      recipe=Recipe(**t.model_dump(include=RECIPE_KEYS)),
                      augment=AugmentConfig(**params.augment.model_dump()), finetune=params.finetune,
                      **params.transfer.model_dump(),
                      class_weights=resolve_class_weights(t.class_weights, train_xy[1], classes),
                      sampler=t.sampler, device=device, precision=t.precision, compile=t.compile,
                      num_threads=t.num_threads, resume_path=paths.RESUME_CHECKPOINT,
                      fingerprint=fingerprint(params, data_hash))
    paths.RESUME_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)

    if rank > 0:  # DDP workers train; rank 0 logs, checkpoints and writes the outputs
        train(model, train_xy, load_split("val", paths.PREPARED_DIR), mean, std, cfg)
        return None
    tags = tracking.run_tags(params.dataset, params.model, params.finetune,
                                  params.pretrained or params.weights is not None) | {"data_hash": data_hash}
    run_id = tracking.start_run(params.mlflow.experiment, params.flat(), tags, paths.MLFLOW_RUN)
    print(f"train: {params.model} ({n_params / 1e6:.2f} M params) on {meta['counts']['train']} images, "
          f"device {cfg.device}, class weights {cfg.class_weights or 'none'}, sampler {cfg.sampler}; "
          f"MLflow run {run_id} in {tracking.tracking_uri()}")
    with tracking.resume_run(paths.MLFLOW_RUN) as mlflow:
        result = train(model, train_xy, load_split("val", paths.PREPARED_DIR), mean, std, cfg,
                       on_epoch=lambda epoch, row: tracking.log_metrics(mlflow, row, step=epoch))
        summary = result.metrics | {"parameters": n_params}
        save_checkpoint(paths.CHECKPOINT, arch=params.model, arch_kwargs=arch_kwargs, state_dict=result.best_state,
                        classes=classes, mean=mean, std=std, image_size=meta["image_size"],
                        resize=meta["resize"], params=params.model_dump(), summary=summary)
        with atomic_path(paths.TRAIN_HISTORY) as tmp:
            result.history.to_csv(tmp, index=False)
        learning_curves(result.history, result.best_epoch, paths.LEARNING_CURVES_PNG)
        write_json(paths.TRAIN_METRICS, summary)
        tracking.log_metrics(mlflow, {k: v for k, v in summary.items()})
        tracking.log_artifacts(mlflow, [paths.TRAIN_HISTORY, paths.LEARNING_CURVES_PNG, paths.AUGMENTED_SAMPLES_PNG])
    print(f"train: best epoch {result.best_epoch}, val accuracy {summary['best_val_accuracy']:.4f}, "
          f"{summary['train_images_per_second']:.0f} images/s → {paths.CHECKPOINT}")
    return summary


if __name__ == "__main__":
    run_cli(main)
