"""The learning-rate range test that `pipeline lr-find` draws (Smith 2015, "Cyclical Learning
Rates"; fastai's `lr_find`), on the train stage's own setup. (`lr: auto`: `Strategy.auto_lr`.)"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn


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


SKIP_START = 10  # range-test steps whose slope `suggest` ignores


def suggest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The lr where the smoothed loss falls fastest (steepest negative slope in log lr), looked
    for before the loss's minimum; fastai's 'steep' suggestion."""
    end = int(np.argmin(losses)) + 1
    if end < 3:
        return float(lrs[max(0, end - 1)])
    slope = np.gradient(losses[:end], np.log(lrs[:end]))
    skip = min(SKIP_START, end // 3)  # the first steps' average is noise: its wiggles are no slope (fastai skips them too)
    return float(lrs[skip + int(np.argmin(slope[skip:]))])


def plot(lrs: np.ndarray, losses: np.ndarray, chosen: float, path: Path, title: str) -> None:
    from pipeline.plots import line_figure

    line_figure(lrs, losses, path, title=title, xlabel="learning rate (log scale)", ylabel="training loss (smoothed)",
                marks={f"suggested {chosen:.2g}": chosen}, logx=True)


def find_lr(params, device: str = "cpu", steps: int = 100) -> tuple[np.ndarray, np.ndarray, float, str]:
    """The range test on the prepared training split with the model, weights, optimizer and
    augmentation the train stage would use: (lrs, smoothed losses, suggested lr, what ran)."""
    from pipeline.prepared import load_split
    from pipeline.training.batches import split_batches
    from pipeline.training.loop import (
        epoch_order,
        image_batches,
        optimizer_for,
        seed_everything,
        set_epoch_mode,
        set_threads,
    )
    from pipeline.training.run import setup

    s = setup(params, device)
    cfg, model = s.cfg, s.model.to(device)
    set_threads(cfg.train.num_threads)
    data = image_batches(load_split("train"), load_split("val"), s.prep, cfg)
    gen = seed_everything(cfg.seed)
    y = cfg.objective.targets(data.y, "cpu")  # class indices, or k-hot rows as floats (task=multilabel)

    def batches():
        while True:
            for idx in split_batches(epoch_order(data.y, cfg.train.sampler, gen), cfg.batch_size):
                idx = np.sort(idx)
                yield data.batch(idx, gen), y[idx].to(device)

    opt = optimizer_for(model, cfg, 1.0)  # the range test sets the lr; the groups keep their ratios
    set_epoch_mode(model, cfg, cfg.strategy.unfrozen_from)  # everything that will train
    loss_fn = lambda logits, target: cfg.objective.loss(logits.float(), target, None, cfg.train.label_smoothing)  # noqa: E731
    lrs, losses = range_test(model, opt, batches(), loss_fn, steps=steps)
    what = f"{params.model}, {cfg.strategy.name}, {cfg.train.optimizer}, batch {cfg.batch_size}"
    return lrs, losses, suggest(lrs, losses), what
