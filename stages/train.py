"""Stage `train`: train the model on the prepared splits; keep the best epoch on validation.

Reads params: model, epochs, batch_size, lr, seed, augment, train, mlflow. Reads: data/prepared/.
Writes: models/model.pt (self-describing checkpoint), models/mlflow_run.json (the MLflow run
that evaluate and export continue), metrics/train.json, metrics/train_history.csv,
metrics/learning_curves.png. Run: `dvc repro train`."""
import hashlib

from pipeline import paths, tracking
from pipeline.checkpoint import save_checkpoint
from pipeline.data import load_meta, load_split
from pipeline.errors import run_cli
from pipeline.io import atomic_path, write_json
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.plots import learning_curves
from pipeline.augment import AugmentConfig
from pipeline.train import TrainConfig, pick_device, resolve_class_weights, seed_everything, train


def data_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(paths.PREPARED_DIR.iterdir()):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def main() -> dict:
    params = load_params()
    meta = load_meta(paths.PREPARED_DIR)
    mean, std, classes = meta["mean"], meta["std"], meta["classes"]
    arch_kwargs = {"num_classes": len(classes), "in_chans": 3}
    seed_everything(params.seed)  # the initial weights depend on the seed too
    model = build_model(params.model, **arch_kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    train_xy = load_split("train", paths.PREPARED_DIR)
    t = params.train
    cfg = TrainConfig(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr, seed=params.seed,
                      optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay, scheduler=t.scheduler,
                      augment=AugmentConfig(**params.augment.model_dump()),
                      class_weights=resolve_class_weights(t.class_weights, train_xy[1], classes),
                      sampler=t.sampler, device=pick_device(t.device), num_threads=t.num_threads)

    tags = tracking.run_tags(params.dataset, params.model) | {"data_hash": data_hash()}
    run_id = tracking.start_run(params.mlflow.experiment, params.flat(), tags, paths.MLFLOW_RUN)
    print(f"train: {params.model} ({n_params / 1e6:.2f} M params) on {meta['counts']['train']} images, "
          f"device {cfg.device}, class weights {cfg.class_weights or 'none'}, sampler {cfg.sampler}; "
          f"MLflow run {run_id} in {tracking.tracking_uri()}")
    with tracking.resume_run(paths.MLFLOW_RUN) as mlflow:
        result = train(model, train_xy, load_split("val", paths.PREPARED_DIR),
                       mean, std, cfg,
                       on_epoch=lambda epoch, row: tracking.log_metrics(mlflow, row, step=epoch))
        summary = result.metrics | {"parameters": n_params}
        save_checkpoint(paths.CHECKPOINT, arch=params.model, arch_kwargs=arch_kwargs, state_dict=result.best_state,
                        classes=classes, mean=mean, std=std, image_size=meta["image_size"],
                        params=params.model_dump(), summary=summary)
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
