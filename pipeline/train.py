"""The training loop: one readable function, batches drawn from uint8 arrays, per-sample
augmentation on the batch, best epoch picked on the validation split."""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.augment import AugmentConfig, augment_batch, normalize
from pipeline.checkpoint import predict_logits


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    augment: AugmentConfig = AugmentConfig()
    class_weights: list[float] | None = None  # loss weight per class; None: all 1
    sampler: str = "shuffle"  # shuffle: each image once per epoch | balanced: classes drawn equally often
    device: str = "cpu"
    num_threads: int = 0  # 0: all cores


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only, not on norms and biases (the usual recipe).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


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


def evaluate_split(model: nn.Module, x: np.ndarray, y: np.ndarray, mean, std) -> tuple[float, float]:
    logits = torch.from_numpy(predict_logits(model, x, mean, std))
    labels = torch.from_numpy(np.asarray(y))
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def train(model: nn.Module, train_xy: tuple[np.ndarray, np.ndarray], val_xy: tuple[np.ndarray, np.ndarray],
          mean: list[float], std: list[float], cfg: TrainConfig,
          on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train `model`; return the best-on-validation weights, the per-epoch history and a
    summary. `on_epoch(epoch, row)` is called after each epoch (MLflow logging)."""
    threads = set_threads(cfg.num_threads)
    gen = seed_everything(cfg.seed)
    x_train, y_train = train_xy
    y_train_t = torch.from_numpy(np.asarray(y_train))
    y_np = np.asarray(y_train)
    steps_per_epoch = len(_batches(np.arange(len(y_np)), cfg.batch_size))
    device = torch.device(cfg.device)
    model.to(device)
    y_train_t = y_train_t.to(device)
    loss_weight = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device) if cfg.class_weights else None
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, max(1, cfg.epochs * steps_per_epoch))

    rows, best_state, best_epoch, best_key = [], None, 0, (-1.0, 0.0)
    train_images, train_seconds = 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(_batches(epoch_order(y_np, cfg.sampler, gen), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}",
                   unit="batch", disable=not (progress and sys.stderr.isatty()), leave=True,
                   mininterval=0.5, dynamic_ncols=True)
        for idx in bar:
            idx = np.sort(idx)  # sorted reads are sequential in a memory-mapped array
            xb = torch.from_numpy(x_train[idx]).to(device, non_blocking=True)
            yb = y_train_t[idx]
            logits = model(normalize(augment_batch(xb, cfg.augment, mean, gen), mean, std))
            loss = F.cross_entropy(logits, yb, weight=loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        epoch_seconds = time.perf_counter() - t0
        train_images += seen
        train_seconds += epoch_seconds
        val_loss, val_acc = evaluate_split(model, *val_xy, mean, std)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "val_loss": val_loss, "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"],
               "images_per_second": seen / epoch_seconds}
        rows.append(row)
        summary = {"loss": f"{row['train_loss']:.4f}", "acc": f"{row['train_accuracy']:.4f}",
                   "val_loss": f"{val_loss:.4f}", "val_acc": f"{val_acc:.4f}",
                   "img_s": f"{row['images_per_second']:.0f}"}
        if bar.disable and progress:  # not a terminal (CI, a log file): one line per epoch
            print(f"epoch {epoch}/{cfg.epochs}: " + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
        bar.set_postfix(summary)
        bar.close()
        if (val_acc, -val_loss) > best_key:  # best accuracy; ties go to the lower loss
            best_key, best_epoch = (val_acc, -val_loss), epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(epoch, row)

    history = pd.DataFrame(rows)
    best = history.iloc[best_epoch - 1]
    metrics = {"best_epoch": best_epoch, "best_val_accuracy": float(best["val_accuracy"]),
               "best_val_loss": float(best["val_loss"]), "epochs_run": len(rows),
               "train_images_per_second": train_images / train_seconds, "train_seconds": train_seconds,
               "threads": threads}
    return TrainResult(best_state, best_epoch, history, metrics)
