"""The training recipe's parts: optimizer, learning-rate schedule with warmup, mixup/cutmix,
early stopping, each read from the `train:` section of params.yaml. The loop
(`pipeline.training.loop`) puts them together."""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.core.params import TrainParams  # the validated `train:` section is the recipe


def param_groups(model: nn.Module, weight_decay: float, lr: float, backbone_lr_mult: float = 1.0,
                 head: set[str] | None = None) -> list[dict]:
    """Weight decay on conv/linear weights only, not on norms and biases (the usual recipe);
    backbone parameters (all but `head`) at lr × backbone_lr_mult. Frozen parameters are
    included: they get no gradient, so no update, until a strategy unfreezes them."""
    groups: dict[tuple[bool, bool], list] = {(b, d): [] for b in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        groups[(head is not None and name not in head, p.ndim > 1)].append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
             "lr": lr * (backbone_lr_mult if backbone else 1.0)}
            for (backbone, decay), ps in groups.items() if ps]


def make_optimizer(groups: list[dict], r: TrainParams, lr: float) -> torch.optim.Optimizer:
    """torch's optimizer of that name; each group keeps its lr and weight decay. (timm's
    create_optimizer_v2 builds the same torch classes, but importing timm adds ~2 s to every train
    stage that does not otherwise need it: `python -X importtime -c "import timm.optim"`.)"""
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0)
    if r.optimizer == "adam":
        # Adam's own weight_decay is L2 added to the gradient: the classic form
        return torch.optim.Adam(groups, lr=lr)
    if r.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=r.momentum, alpha=0.9, eps=1e-3)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(step: int, total: int, warmup: int, r: TrainParams, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimisation step `step` (0-based) of `total`."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if r.scheduler == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if r.scheduler == "step":
        return r.step_gamma ** (step // (r.step_epochs * steps_per_epoch))
    return 1.0


def make_scheduler(opt: torch.optim.Optimizer, r: TrainParams, epochs: int, steps_per_epoch: int):
    """Warmup and schedule as one closed-form LambdaLR: torch's chained LinearLR → CosineAnnealingLR
    and timm's CosineLRScheduler give the same curve with other float rounding (other weights)."""
    total = max(1, epochs * steps_per_epoch)
    if r.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    warmup = int(round(r.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, r, steps_per_epoch))


def make_mixer(r: TrainParams, num_classes: int):
    """torchvision's batch MixUp / CutMix (one λ per batch, soft targets), or None."""
    if not (r.mixup_alpha or r.cutmix_alpha):
        return None
    from torchvision.transforms import v2

    mixers = []
    if r.mixup_alpha:
        mixers.append(v2.MixUp(alpha=r.mixup_alpha, num_classes=num_classes))
    if r.cutmix_alpha:
        mixers.append(v2.CutMix(alpha=r.cutmix_alpha, num_classes=num_classes))
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class EarlyStopping:
    """Tracks the monitored metric; `step()` says whether this epoch is the best so far,
    `should_stop` when `patience` epochs passed without an improvement larger than `min_delta`.

    Accuracy on a small validation split moves in coarse steps (1/270 on digits), so epochs
    often tie on it: a tie goes to the epoch with the lower validation loss (`tiebreak`), which
    is the better-trained model, rather than to whichever came first. A tie does not count as
    an improvement for patience."""

    def __init__(self, monitor: str, patience: int, min_delta: float):
        self.sign = -1.0 if monitor == "val_loss" else 1.0  # larger is better after the sign
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best = -math.inf
        self.best_tiebreak = math.inf
        self.wait = 0

    def step(self, value: float, tiebreak: float | None = None) -> bool:
        score = self.sign * value
        if score > self.best + self.min_delta:
            self.best, self.best_tiebreak, self.wait = score, math.inf if tiebreak is None else tiebreak, 0
            return True
        self.wait += 1
        if tiebreak is not None and score == self.best and tiebreak < self.best_tiebreak:
            self.best_tiebreak = tiebreak
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_tiebreak": self.best_tiebreak, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_tiebreak, self.wait = float(state["best"]), float(state["best_tiebreak"]), int(state["wait"])
