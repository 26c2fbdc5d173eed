"""The training loop: one readable function, batches drawn from uint8 arrays, per-sample
augmentation on the batch, best epoch picked on the validation split."""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.augment import AugmentConfig, augment_batch, normalize
from pipeline.checkpoint import predict_logits
from pipeline.io import atomic_path
from pipeline.recipe import EarlyStopping, Recipe, make_mixer, make_optimizer, make_scheduler, param_groups
from pipeline.transfer import apply_trainable, freeze_batchnorm_stats, head_parameter_names, trainable_names


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    recipe: Recipe = Recipe()
    augment: AugmentConfig = AugmentConfig()
    finetune: str = "full"        # full | linear_probe | partial | two_phase (pipeline.transfer)
    unfreeze_stages: int = 1      # partial: last N backbone stages train
    head_epochs: int = 1          # two_phase: epochs of head-only training first
    backbone_lr_mult: float = 1.0  # backbone lr = lr × this
    class_weights: list[float] | None = None  # loss weight per class; None: all 1
    sampler: str = "shuffle"  # shuffle: each image once per epoch | balanced: classes drawn equally often
    device: str = "cpu"
    precision: str = "auto"   # GPU only: auto (bf16 where supported, else fp16) | bf16 | fp16 | fp32
    compile: bool = False     # torch.compile the model
    num_threads: int = 0      # 0: all cores
    resume_path: Path | None = None  # checkpoint written after every epoch, resumed from when it matches
    fingerprint: str = ""     # hash of what makes the run (params, data, code): resume only when equal


@dataclass
class TrainResult:
    best_state: dict
    best_epoch: int
    history: pd.DataFrame
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(num_threads: int) -> int:
    n = num_threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def pick_device(spec: str) -> str:
    """`auto`: cuda when a GPU is visible, else cpu. Asking for cuda without one is an error."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import UserError

        raise UserError("train.device=cuda but no CUDA GPU is visible to torch; use train.device=auto or cpu")
    return spec


def resolve_class_weights(spec: str | list[float], labels: np.ndarray, classes: list[str]) -> list[float] | None:
    """`none` → None; `balanced` → n / (k · count_c) (scikit-learn's definition); a list is
    checked against the number of classes."""
    if spec == "none":
        return None
    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(labels)
        weights = np.zeros(len(classes))
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
        return [float(w) for w in weights]
    if len(spec) != len(classes):
        from pipeline.errors import UserError

        raise UserError(f"train.class_weights has {len(spec)} values but the data set has {len(classes)} classes "
                        f"({', '.join(classes)}); give one weight per class")
    return [float(w) for w in spec]


def epoch_order(labels: np.ndarray, sampler: str, gen: torch.Generator) -> np.ndarray:
    """The training indices of one epoch: a permutation (`shuffle`), or `balanced`: as many
    draws with replacement, each class equally likely (WeightedRandomSampler's scheme)."""
    n = len(labels)
    if sampler == "balanced":
        counts = np.bincount(labels)
        weights = torch.from_numpy(1.0 / counts[labels])
        return torch.multinomial(weights, n, replacement=True, generator=gen).numpy()
    return torch.randperm(n, generator=gen).numpy()


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # BatchNorm cannot train on a batch of one: fold a lone last sample out of the epoch.
    return [b for b in batches if len(b) > 1]


def head_out_features(model: nn.Module) -> int:
    from pipeline.models import head_of

    return head_of(model).out_features


def evaluate_split(model: nn.Module, x: np.ndarray, y: np.ndarray, mean, std) -> tuple[float, float]:
    logits = torch.from_numpy(predict_logits(model, x, mean, std))
    labels = torch.from_numpy(np.asarray(y))
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def _rng_state(gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(), "aug_gen": aug_gen.get_state(),
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict, gen: torch.Generator, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    aug_gen.set_state(state["aug_gen"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless running under torchrun with a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of an epoch's order, as DistributedSampler does: padded (wrapping
    around) to a multiple of the world size, then every world-th index from `rank`."""
    if world == 1:
        return order
    padded = np.resize(order, -(-len(order) // world) * world)
    return padded[rank::world]


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on GPUs that have it, fp16 (with a grad scaler) otherwise; CPU: fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None, None
    dtype = torch.float16 if precision == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, scaler


def train(model: nn.Module, train_xy: tuple[np.ndarray, np.ndarray], val_xy: tuple[np.ndarray, np.ndarray],
          mean: list[float], std: list[float], cfg: TrainConfig,
          on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `model`; return the best-on-validation weights, the per-epoch history and a
    summary. `on_epoch(epoch, row)` is called after each epoch (MLflow logging). With
    `cfg.resume_path`, a checkpoint is written after every epoch and a matching one is resumed."""
    rank, world = distributed()
    progress = progress and rank == 0
    threads = set_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world))
    gen = seed_everything(cfg.seed)  # the epoch order: the same on every rank
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + rank)  # augmentation: each rank its own
    r = cfg.recipe
    x_train, y_train = train_xy
    y_np = np.asarray(y_train)
    num_classes = int(head_out_features(model))
    steps_per_epoch = len(_batches(shard(np.arange(len(y_np)), rank, world), cfg.batch_size))
    device = torch.device(cfg.device)
    model.to(device)
    # channels_last (NHWC) on CPU too: oneDNN's convolutions run ~1.2x faster in it on this
    # 2-core AVX2 machine (resnet18 and our CNN at 32 px; benchmarks/bench_data_path.py), as on GPUs.
    model.to(memory_format=torch.channels_last)
    amp_dtype, scaler = _autocast(device, cfg.precision)
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # frozen parameters (transfer strategies) get no gradient: tell DDP not to wait for them
        forward = DistributedDataParallel(model, find_unused_parameters=cfg.finetune != "full")
    forward = torch.compile(forward) if cfg.compile else forward
    y_train_t = torch.from_numpy(y_np).to(device)
    loss_weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device) if cfg.class_weights else None
    head = head_parameter_names(model)
    opt = make_optimizer(param_groups(model, r.weight_decay, cfg.lr, cfg.backbone_lr_mult, head), r, cfg.lr)
    sched = make_scheduler(opt, r, cfg.lr, cfg.epochs, steps_per_epoch)
    mixer = make_mixer(r, num_classes)
    stopper = EarlyStopping(r.monitor, r.patience, r.min_delta)
    rows, best_state, best_epoch, start_epoch = [], None, 0, 1

    if cfg.resume_path and cfg.resume_path.exists():
        ckpt = torch.load(cfg.resume_path, map_location="cpu", weights_only=True)
        if ckpt.get("fingerprint") == cfg.fingerprint:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if scaler and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            stopper.load_state_dict(ckpt["early_stopping"])
            rows, best_state, best_epoch = ckpt["history"], ckpt["best_state"], ckpt["best_epoch"]
            start_epoch = ckpt["epoch"] + 1
            _set_rng_state(ckpt["rng"], gen, aug_gen)
            if rank == 0:
                print(f"train: resuming from {cfg.resume_path} after epoch {ckpt['epoch']}", flush=True)
            for row in rows:  # the new run gets the whole curve
                if on_epoch and rank == 0:
                    on_epoch(row["epoch"], row)
        else:
            if rank == 0:
                print(f"train: {cfg.resume_path} was made with other params, data or code; starting fresh", flush=True)

    train_images, train_seconds = 0, 0.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopper.should_stop:
            break
        trainable = apply_trainable(model, trainable_names(model, cfg.finetune, cfg.unfreeze_stages, epoch,
                                                           cfg.head_epochs))
        if progress and (epoch == start_epoch or (cfg.finetune == "two_phase" and epoch == cfg.head_epochs + 1)):
            print(f"train: epoch {epoch}: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
                  f"parameters train ({cfg.finetune})", flush=True)
        model.train()
        freeze_batchnorm_stats(model)
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        order = shard(epoch_order(y_np, cfg.sampler, gen), rank, world)
        bar = tqdm(_batches(order, cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                   unit="batch", disable=not (progress and sys.stderr.isatty()), leave=True,
                   mininterval=0.5, dynamic_ncols=True)
        for idx in bar:
            idx = np.sort(idx)  # sorted reads are sequential in a memory-mapped array
            xb = torch.from_numpy(x_train[idx]).to(device, non_blocking=True)
            yb = y_train_t[idx]
            xb = normalize(augment_batch(xb, cfg.augment, mean, aug_gen), mean, std)
            target = yb
            if mixer is not None:
                xb, target = mixer(xb, yb)  # soft targets, one λ per batch
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = forward(xb)
            loss = F.cross_entropy(logits.float(), target, weight=loss_weight, label_smoothing=r.label_smoothing)
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if r.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            hard = target.argmax(1) if target.ndim == 2 else target
            correct += int((logits.argmax(1) == hard).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        if world > 1:  # every rank's share of the epoch, summed
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
        epoch_seconds = time.perf_counter() - t0
        train_images += seen
        train_seconds += epoch_seconds
        val_loss, val_acc = evaluate_split(model, *val_xy, mean, std)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "val_loss": val_loss, "val_accuracy": val_acc, "lr": opt.param_groups[-1]["lr"],
               "images_per_second": seen / epoch_seconds, "trainable_params": trainable}
        rows.append(row)
        summary = {"loss": f"{row['train_loss']:.4f}", "acc": f"{row['train_accuracy']:.4f}",
                   "val_loss": f"{val_loss:.4f}", "val_acc": f"{val_acc:.4f}",
                   "img_s": f"{row['images_per_second']:.0f}"}
        if bar.disable and progress:  # not a terminal (CI, a log file): one line per epoch
            print(f"epoch {epoch}/{cfg.epochs}: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
        bar.set_postfix(summary)
        bar.close()
        if stopper.step(row[r.monitor], row["val_loss"] if r.monitor == "val_accuracy" else None):
            best_epoch = epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch and rank == 0:
            on_epoch(epoch, row)
        if cfg.resume_path and rank == 0:
            with atomic_path(cfg.resume_path) as tmp:
                torch.save({"fingerprint": cfg.fingerprint, "epoch": epoch, "model": model.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "scaler": scaler.state_dict() if scaler else None,
                            "early_stopping": stopper.state_dict(), "history": rows, "best_state": best_state,
                            "best_epoch": best_epoch, "rng": _rng_state(gen, aug_gen)}, tmp)
        if stopper.should_stop and progress:
            print(f"train: early stopping after epoch {epoch}: {r.monitor} has not improved by more than "
                  f"{r.min_delta} for {r.patience} epochs; best epoch {best_epoch}", flush=True)

    history = pd.DataFrame(rows)
    best = history.iloc[best_epoch - 1]
    metrics = {"best_epoch": best_epoch, "best_val_accuracy": float(best["val_accuracy"]),
               "best_val_loss": float(best["val_loss"]), "epochs_run": len(rows),
               "stopped_early": bool(stopper.should_stop and len(rows) < cfg.epochs),
               "train_images_per_second": train_images / train_seconds if train_seconds else 0.0,
               "train_seconds": train_seconds, "threads": threads, "processes": world}
    if world > 1:
        torch.distributed.barrier()  # no rank may still be reading the resume checkpoint
    if cfg.resume_path and rank == 0:
        cfg.resume_path.unlink(missing_ok=True)  # done: a forced re-run starts from scratch
    return TrainResult(best_state, best_epoch, history, metrics)
