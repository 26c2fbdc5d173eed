"""What the train stage does, as library functions: build the model from the params (weights,
neutral head, preprocessing), resolve `lr: auto`, fingerprint the run for resume, train
(images, or cached features for a linear probe) and write the outputs."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import mlstore, runview, tracking

from pipeline.calibration import fit_sigmoid_temperature, fit_temperature, scaled, sigmoid
from pipeline.checkpoint import save_checkpoint
from pipeline.codedeps import stage_files
from pipeline.core import paths, warm
from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path, file_sha256, files_sha256, write_json
from pipeline.core.params import Params, stage_keys
from pipeline.core.preprocess import Preprocessing
from pipeline.models import entry
from pipeline.models.registry import arch_kwargs
from pipeline.models.weights import build_transfer_model
from pipeline.plots import pair_figure, save
from pipeline.prepared import label_text, load_meta, load_split
from pipeline.training import trial
from pipeline.training.augment import augment_batch
from pipeline.training.loop import (
    TrainConfig,
    TrainResult,
    resolve_class_weights,
    resume_epoch,
    seed_everything,
    train,
)
from pipeline.training.strategy import Strategy

RECORDS = ("mlflow.experiment", "mlflow.required", "train.num_threads")  # how the run is recorded, or its speed: not inputs


def fingerprint(params: Params, data_hash: str) -> str:
    """What makes a training run: the train stage's params (its `params:` in dvc.yaml) less
    RECORDS, the data and the code the stage executes (the files its dvc.yaml deps must cover:
    `pipeline.codedeps`)."""
    keys = stage_keys("train")
    relevant = {k: v for k, v in params.flat().items()
                if k not in RECORDS and (k in keys or k.split(".")[0] in keys)}
    code = files_sha256(stage_files("train"))
    return hashlib.sha256(json.dumps([relevant, data_hash, code], sort_keys=True).encode()).hexdigest()[:16]


def arch_kwargs_for(params: Params, num_classes: int, image_size: int) -> dict:
    return arch_kwargs(params.model, num_classes, image_size, params.train.dropout, params.train.drop_path)


@dataclass
class Setup:
    """A training run, resolved from the params: the model and everything `train` needs."""
    model: nn.Module
    arch_kwargs: dict
    prep: Preprocessing
    classes: list[str]
    cfg: TrainConfig
    lr_note: str            # how the learning rate was chosen
    data_hash: str


def build_model_for(params: Params, classes: list[str], image_size: int) -> tuple[nn.Module, dict, bool]:
    arch_kwargs = arch_kwargs_for(params, len(classes), image_size)
    seed_everything(params.seed)  # the initial weights depend on the seed too
    try:
        model, transferred = build_transfer_model(params.model, len(classes), params.pretrained, params.weights,
                                                  {k: v for k, v in arch_kwargs.items() if k != "num_classes"})
    except TypeError as exc:  # e.g. drop_path_rate for a model without stochastic depth
        raise UserError(f"model={params.model!r} does not take these options: {exc}; "
                        "set train.drop_path: 0 (or train.dropout: null) for this model") from None
    return model, arch_kwargs, transferred


def setup(params: Params, device: str, prepared: Path = paths.PREPARED_DIR) -> Setup:
    meta = load_meta(prepared)
    prep, classes = Preprocessing.from_dict(meta["preprocessing"]), meta["classes"]
    model, arch_kwargs, transferred = build_model_for(params, classes, prep.image_size)
    t = params.train
    strategy = Strategy.resolve(params)
    assert strategy.transferred == transferred
    if params.lr == "auto":
        lr, why = strategy.auto_lr(t.optimizer, entry(params.model).has_batchnorm)
        lr_note = f"lr {lr:g} (auto: {why})"
    else:
        lr, lr_note = float(params.lr), f"lr {params.lr:g}"
    data_hash = files_sha256(sorted(prepared.iterdir()))
    cfg = TrainConfig(epochs=params.epochs, batch_size=params.batch_size, lr=lr, seed=params.seed,
                      train=t, augment=params.augment, strategy=strategy,
                      class_weights=resolve_class_weights(t.class_weights, load_split("train", prepared)[1], classes),
                      device=device, resume_path=paths.RESUME_CHECKPOINT, fingerprint=fingerprint(params, data_hash),
                      multilabel=meta.get("task") == "multilabel")
    return Setup(model, arch_kwargs, prep, classes, cfg, lr_note, data_hash)


def fit_model(s: Setup, on_epoch=None, progress: bool = True, prepared: Path = paths.PREPARED_DIR) -> TrainResult:
    """Train on the prepared train split, validating on the val split."""
    if s.cfg.resume_path:
        s.cfg.resume_path.parent.mkdir(parents=True, exist_ok=True)
    return fit_arrays(s, load_split("train", prepared), load_split("val", prepared), on_epoch, progress)


def fit_arrays(s: Setup, train_xy: tuple[np.ndarray, np.ndarray], val_xy: tuple[np.ndarray, np.ndarray],
               on_epoch=None, progress: bool = True) -> TrainResult:
    """Train on any (images, labels) pair: a linear probe on cached features, or the loop on
    images (the train stage; each fold of cross-validation)."""
    if s.cfg.strategy.cached_features:
        from pipeline.training.probe import train_linear_probe

        return train_linear_probe(s.model, train_xy, val_xy, s.prep, s.cfg, on_epoch, progress)
    return train(s.model, train_xy, val_xy, s.prep, s.cfg, on_epoch, progress)


def augmented_samples(s: Setup, path: Path, prepared: Path = paths.PREPARED_DIR,
                      n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """The augmentation training applies, for a person to check: `n` training images, each as
    evaluation sees it (the centre crop) beside one augmented draw of it. Returns both (uint8)."""
    if not s.cfg.strategy.trains_on_augmented_images:
        return _no_augmentation(path)
    x, y = load_split("train", prepared)
    n = min(n, len(y))
    aug = augment_batch(torch.from_numpy(np.array(x[:n])), s.cfg.augment, s.prep.mean,
                        torch.Generator().manual_seed(s.cfg.seed), s.prep.image_size, s.cfg.augment.resized_crop)
    on = ", ".join(f"{k}={v}" for k, v in s.cfg.augment.model_dump().items() if v and not k.startswith("resized_crop"))
    if s.cfg.augment.resized_crop:
        on = ", ".join(filter(None, [f"resized crop {s.cfg.augment.resized_crop_scale}", on]))
    originals, augmented = np.array(s.prep.center_crop(x[:n])), (aug.numpy() * 255).round().astype(np.uint8)
    fig = pair_figure(originals, augmented, label_text(y[:n], s.classes), ("original", "augmented"),
                      "Augmented training samples: each image as evaluated (centre crop, left) and as training sees "
                      f"it (right)\n{on or 'no augmentation'}")
    save(fig, path, whole=True)
    return originals, augmented


def _no_augmentation(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The picture's place (a DVC output) says why there is nothing to show."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 1.2))
    fig.text(0.5, 0.5, "No augmentation: a linear probe trains its head on features of the unaugmented\n"
             "training images, computed once (transfer.augmented_passes: 0)", ha="center", va="center", fontsize=10)
    save(fig, path)
    return np.zeros((0,), np.uint8), np.zeros((0,), np.uint8)


def calibrate(s: Setup, result: TrainResult, prepared: Path = paths.PREPARED_DIR) -> float | None:
    """The temperature of the kept weights, fitted on the validation split (`train.calibrate`),
    from the validation logits training computed anyway (no extra pass); None when off. For
    labels, one temperature for all of them (sigmoid(logits / T))."""
    if not s.cfg.train.calibrate or result.val_logits is None:
        return None
    fit = fit_sigmoid_temperature if s.cfg.multilabel else fit_temperature
    t, note = fit(result.val_logits, load_split("val", prepared)[1])
    print(f"train: calibration: {note}", flush=True)
    return t


def thresholds(s: Setup, result: TrainResult, t: float | None, prepared: Path = paths.PREPARED_DIR) -> list[float] | None:
    """task=multilabel: each label's threshold on the probabilities export and predict give
    (calibrated when T was fitted), chosen on the validation split by `train.thresholds`."""
    if not s.cfg.multilabel or result.val_logits is None:
        return None
    from pipeline.evaluation.multilabel import choose_thresholds

    y = load_split("val", prepared)[1]
    chosen = choose_thresholds(y, sigmoid(scaled(result.val_logits, t or 1.0)), s.cfg.train.thresholds)
    print(f"train: thresholds per label (train.thresholds={s.cfg.train.thresholds}, on {len(y)} validation images): "
          + ", ".join(f"{c} {v:.3f}" for c, v in zip(s.classes, chosen)), flush=True)
    return [float(v) for v in chosen]


def conformal_scores(s: Setup, result: TrainResult, t: float | None,
                     prepared: Path = paths.PREPARED_DIR) -> list[float] | None:
    """One class per image: the validation images' conformal scores under the calibrated
    probabilities (`pipeline.conformal`), for prediction sets at any α; None for labels."""
    if s.cfg.multilabel or result.val_logits is None:
        return None
    from pipeline.conformal import calibration_scores
    from pipeline.probabilities import softmax

    return calibration_scores(softmax(scaled(result.val_logits, t or 1.0)), load_split("val", prepared)[1])


def write_outputs(s: Setup, params: Params, result: TrainResult) -> dict:
    """models/model.pt (with its temperature), the history and metrics/train.json: the same
    bytes for the same inputs. Timings go to metrics/train_timing.json, which no stage uses.
    (The learning curves are drawn by evaluate, with `plots.smoothing`: redrawing them does
    not retrain.)"""
    n_params = sum(p.numel() for p in s.model.parameters())
    summary = result.metrics | {"parameters": n_params, "lr": s.cfg.lr}
    t = calibrate(s, result)
    save_checkpoint(paths.CHECKPOINT, arch=params.model, arch_kwargs=s.arch_kwargs, state_dict=result.best_state,
                    classes=s.classes, prep=s.prep, params=params.model_dump(), summary=summary,
                    data_hash=s.data_hash, temperature=t, thresholds=thresholds(s, result, t),
                    conformal_scores=conformal_scores(s, result, t), fingerprint=s.cfg.fingerprint,
                    val_logits=None if result.val_logits is None else np.asarray(result.val_logits))
    with atomic_path(paths.TRAIN_HISTORY) as tmp:
        result.history.drop(columns=["images_per_second"]).to_csv(tmp, index=False)
    write_json(paths.TRAIN_METRICS, summary)
    write_json(paths.TRAIN_TIMING, result.timing | {"warm_start": warm.forked(),  # torch & co. imported before it started
                                                    "checkpoint_sha256": file_sha256(paths.CHECKPOINT)})
    return summary


def run(params: Params, device: str, rank: int) -> dict | None:
    """The train stage on this process (rank 0 logs and writes; DDP workers only train). With
    `crossval.folds` k > 0 the k folds have run already (`stages.train`); rank 0 gathers them."""
    if rank == 0:
        mlstore.make_store_beside()  # a new store's migrations run on the other core while the model is built
    s = setup(params, device)
    if rank == 0:
        tracker = tracking.Tracker.open(params)  # an unusable store stops the stage here, before any output is written
    if rank > 0:
        fit_model(s, progress=False)
        return None
    augmented_samples(s, paths.AUGMENTED_SAMPLES_PNG)
    n_params = sum(p.numel() for p in s.model.parameters())
    n_train = len(load_split("train")[1])
    who = runview.run_identity(params, lr=s.cfg.lr, n_params=n_params, n_classes=len(s.classes), n_train=n_train,
                               image_size=s.prep.image_size, data_hash=s.data_hash, multilabel=s.cfg.multilabel)
    resumed = resume_epoch(s.cfg) if not s.cfg.strategy.cached_features else 0
    before = tracking.recorded_run(paths.MLFLOW_RUN).get("run_id")
    run_id = tracker.start_run(who.experiment, who.name, who.params,
                               who.tags | {tracking.NOTE: who.note} | trial.parent_run_tags(), paths.MLFLOW_RUN,
                               resuming=resumed > 0, experiment_tags=who.experiment_tags)
    # a continued run already holds the epochs logged before the kill
    logged_until = (tracking.last_step(run_id, runview.CURVES["val_accuracy"])
                    if run_id is not None and run_id == before else 0)
    print(f"train: preprocessing {s.prep.image_size} px (stored {s.prep.stored_size}), mean {_short(s.prep.mean)}, "
          f"std {_short(s.prep.std)}: {s.prep.reason}", flush=True)
    print(f"train: {params.model} ({n_params / 1e6:.2f} M params) on {n_train} images, "
          f"{s.lr_note}, device {s.cfg.device}, class weights {s.cfg.class_weights or 'none'}, sampler "
          f"{s.cfg.train.sampler}; MLflow run {run_id or 'off'}", flush=True)
    prune = trial.pruning_hook(single_process=params.train.nproc == 1)
    with tracker.active_run(run_id) as mlflow:
        def on_epoch(epoch: int, row: dict) -> None:
            if epoch > logged_until:
                tracking.log_metrics(mlflow, runview.epoch_metrics(row), step=epoch)
            if prune:
                prune(epoch, row)  # a trial of `pipeline tune` behind the others stops here

        result = fit_model(s, on_epoch=on_epoch)
        summary = write_outputs(s, params, result)
        folds = crossval_outputs(params, s.cfg.fingerprint, mlflow, who)
        tracker.bind_run(paths.MLFLOW_RUN, paths.CHECKPOINT)
        log_training(mlflow, summary, result.timing, folds,
                     {"trainable_params_per_epoch": result.history["trainable_params"].tolist()})
    speed = (f"features at {result.timing['feature_images_per_second']:.0f} images/s"
             if "feature_images_per_second" in result.timing else
             f"{result.timing['train_images_per_second']:.0f} images/s")
    score = (f"val mAP {summary['best_val_map']:.4f}" if "best_val_map" in summary
             else f"val accuracy {summary['best_val_accuracy']:.4f}")
    print(f"train: best epoch {result.best_epoch}, {score}, "
          f"{speed} → {paths.CHECKPOINT}")
    return summary


def crossval_outputs(params: Params, fp: str, mlflow, who: runview.RunIdentity) -> dict:
    """metrics/crossval.json and metrics/oof_predictions.csv from the folds' records (run
    before training by `stages.train`), a nested MLflow run per fold; the records then go."""
    import shutil

    from pipeline.crossval.fold import finished
    from pipeline.crossval.summary import log_folds, summarize

    k = params.crossval.folds
    records = [finished(f, k, fp) for f in range(k)]
    if any(r is None for r in records):  # only by a bug: stages.train runs every fold first
        raise UserError(f"cross-validation: a fold record is missing in {paths.CROSSVAL_RECORDS}; re-run train")
    summary = summarize(records)
    log_folds(mlflow, who.name, who.tags, records)
    shutil.rmtree(paths.CROSSVAL_RECORDS, ignore_errors=True)
    return summary


def log_training(mlflow, summary: dict, timing: dict, crossval: dict, diagnostics: dict) -> None:
    """Train's results in its MLflow run: the headline figures, the diagnostics, its files (the
    report stage adds the rest, and all of it to a new run when DVC restored train's outputs)."""
    from pipeline.crossval.summary import summary_metrics

    tracking.log_metrics(mlflow, runview.train_metrics(summary, timing) | summary_metrics(crossval))
    tracking.log_diagnostics(mlflow, "train", timing | diagnostics)
    tracking.log_artifacts(mlflow, [paths.TRAIN_METRICS, paths.TRAIN_HISTORY, paths.CROSSVAL_METRICS])


def _short(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
