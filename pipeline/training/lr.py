"""Learning rates: `lr: auto` (per-family defaults, each proven by a run) and the range test
that `pipeline lr-find` draws (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

`lr: auto` picks by optimizer, by whether the model has BatchNorm, and by what trains:

| what trains                                 | AdamW / Adam | SGD   | RMSprop |
|---------------------------------------------|--------------|-------|---------|
| from scratch, a BatchNorm CNN               | 3e-3         | 0.05  | 1e-3    |
| from scratch, no BatchNorm (AlexNet, ViTs)  | 1e-3         | 0.02  | 3e-4    |
| fine-tuning pretrained weights (full, partial, two_phase): the head's lr; the backbone's is × transfer.backbone_lr_mult | 1e-3 | 0.02 | 3e-4 |
| linear probe on cached, standardised features | 1e-2       | 0.1   | 1e-3    |

Runs behind them (README "Measured"): our CNN at 3e-3 (digits 0.996); AlexNet does not learn at
3e-3 and does at 1e-3 (digits 0.952); efficientnet_b0 at 3e-3 (0.941); fine-tuning and the
probe on real ImageNet weights: benchmarks/bench_transfer.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

BASE = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.05, "rmsprop": 1e-3}
NO_BATCHNORM = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.02, "rmsprop": 3e-4}
FINE_TUNE = NO_BATCHNORM
PROBE = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.1, "rmsprop": 1e-3}


def auto_lr(optimizer: str, has_batchnorm: bool, transferred: bool, finetune: str) -> tuple[float, str]:
    """(learning rate, why) for `lr: auto`."""
    if finetune == "linear_probe":
        return PROBE[optimizer], f"{optimizer}, linear probe on cached features"
    if transferred:
        return FINE_TUNE[optimizer], f"{optimizer}, fine-tuning pretrained weights ({finetune}): the head's lr"
    if not has_batchnorm:
        return NO_BATCHNORM[optimizer], f"{optimizer}, from scratch, a model without BatchNorm"
    return BASE[optimizer], f"{optimizer}, from scratch, a BatchNorm model"


# ---------------------------------------------------------------- the range test


def range_test(model: nn.Module, opt: torch.optim.Optimizer, batches, loss_fn, start: float = 1e-6,
               end: float = 1.0, steps: int = 100, diverge: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Train for up to `steps` batches while the lr grows exponentially from `start` to `end`
    (each param group keeps its ratio to the first); stop once the smoothed loss exceeds
    `diverge` × its minimum. Returns (lrs, smoothed losses). The model's weights are restored."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ratios = [g["lr"] / opt.param_groups[0]["lr"] for g in opt.param_groups]
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    for i, (xb, yb) in zip(range(steps), batches):
        lr = start * (end / start) ** (i / max(1, steps - 1))
        for g, ratio in zip(opt.param_groups, ratios):
            g["lr"] = lr * ratio
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = 0.98 * avg + 0.02 * loss.item()
        smoothed = avg / (1 - 0.98 ** (i + 1))  # bias-corrected exponential moving average
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > diverge * best:
            break
    model.load_state_dict(saved)
    return np.array(lrs), np.array(losses)


def suggest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The lr where the smoothed loss falls fastest (steepest negative slope in log lr), looked
    for before the loss's minimum; fastai's 'steep' suggestion."""
    end = int(np.argmin(losses)) + 1
    if end < 3:
        return float(lrs[max(0, end - 1)])
    slope = np.gradient(losses[:end], np.log(lrs[:end]))
    return float(lrs[int(np.argmin(slope))])


def plot(lrs: np.ndarray, losses: np.ndarray, chosen: float, path: Path, title: str) -> None:
    from pipeline.plots import line_figure

    line_figure(lrs, losses, path, title=title, xlabel="learning rate (log scale)", ylabel="training loss (smoothed)",
                marks={f"suggested {chosen:.2g}": chosen}, logx=True)


def find_lr(params, device: str = "cpu", steps: int = 100) -> tuple[np.ndarray, np.ndarray, float, str]:
    """The range test on the prepared training split with the model, weights, optimizer and
    augmentation the train stage would use: (lrs, smoothed losses, suggested lr, what ran)."""
    import torch.nn.functional as F

    from pipeline.prepared import load_split
    from pipeline.training.batches import ImageBatches
    from pipeline.training.loop import (
        _batches,
        epoch_order,
        seed_everything,
        set_threads,
    )
    from pipeline.training.recipe import make_optimizer, param_groups
    from pipeline.training.run import setup
    from pipeline.training.transfer import (
        apply_trainable,
        freeze_batchnorm_stats,
        trainable_names,
    )

    s = setup(params, device)
    cfg, model = s.cfg, s.model.to(device)
    set_threads(cfg.train.num_threads)
    apply_trainable(model, trainable_names(model, cfg.finetune, cfg.transfer.unfreeze_stages,
                                           cfg.transfer.head_epochs + 1, cfg.transfer.head_epochs))
    data = ImageBatches(load_split("train"), load_split("val"), s.prep, cfg.augment, cfg.resized_crop, device)
    gen = seed_everything(cfg.seed)
    y = torch.from_numpy(np.asarray(data.y))

    def batches():
        while True:
            for idx in _batches(epoch_order(data.y, cfg.train.sampler, gen), cfg.batch_size):
                idx = np.sort(idx)
                yield data.batch(idx, gen), y[idx].to(device)

    opt = make_optimizer(param_groups(model, cfg.train.weight_decay, 1.0, cfg.backbone_lr_mult,
                                      _head_names(model)), cfg.train, 1.0)
    model.train()
    freeze_batchnorm_stats(model, everywhere=cfg.frozen_bn_stats)
    loss_fn = lambda logits, target: F.cross_entropy(logits, target, label_smoothing=cfg.train.label_smoothing)  # noqa: E731
    lrs, losses = range_test(model, opt, batches(), loss_fn, steps=steps)
    what = f"{params.model}, {cfg.finetune}, {cfg.train.optimizer}, batch {cfg.batch_size}"
    return lrs, losses, suggest(lrs, losses), what


def _head_names(model: nn.Module) -> set[str]:
    from pipeline.models import head_parameter_names

    return head_parameter_names(model)
