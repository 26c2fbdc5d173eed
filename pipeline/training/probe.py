"""The linear probe on cached features ("feature extraction without augmentation").

With `finetune: linear_probe` the backbone is frozen, so its output for an image never changes:
each split goes through it once (`extract_features`; or `transfer.augmented_passes` times for
the training split, each pass with its own augmentation), and the head is trained on the
cached penultimate features by the same loop, recipe and best-epoch rule as any model
(`pipeline.training.loop.fit`), for as many epochs as asked, in seconds. Features are standardised
for the optimiser and the scaling is folded back into the head afterwards, so the result is an
ordinary model (backbone + head): evaluate, export and predict do not know the difference.

The head is a regularised logistic regression: cross-entropy + λ/2·‖W‖² (L2 in the loss, so
`adamw` becomes `adam` here; sgd and rmsprop add it that way anyway). With `transfer.probe_l2:
auto`, λ is picked from L2_GRID by the lowest validation log loss, a head fitted per value
(seconds each), as scikit-learn's LogisticRegressionCV picks C. How close the probe comes to
scikit-learn's LogisticRegression on the same features (the ceiling a linear probe must reach):
`python benchmarks/bench_transfer.py`.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.preprocess import Preprocessing
from pipeline.models import head_of, pre_logits
from pipeline.training.augment import augment_batch
from pipeline.training.batches import device_indices
from pipeline.training.loop import TrainConfig, TrainResult, fit, set_threads
from pipeline.training.strategy import Strategy

BATCH = 64  # images per forward pass of the frozen backbone
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # λ of `probe_l2: auto`, on standardised features


@torch.inference_mode()
def extract_features(model: nn.Module, images: np.ndarray, prep: Preprocessing, cfg: TrainConfig | None = None,
                     gen: torch.Generator | None = None, desc: str = "features") -> np.ndarray:
    """Penultimate features (N×D float32) of stored uint8 images: under the evaluation
    preprocessing, or augmented as in training when `cfg` is given."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)
    for start in range(0, len(images), BATCH):
        xb = torch.from_numpy(np.array(images[start:start + BATCH])).to(device)
        if cfg is None:
            xb = prep.model_input(xb)
        else:
            aug = cfg.augment
            xb = prep.normalize(augment_batch(xb, aug, prep.mean, gen, prep.image_size, aug.resized_crop))
        out.append(pre_logits(model, xb.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
        bar.update(len(xb))
    bar.close()
    return np.concatenate(out)


class _Head(nn.Module):
    """The classifier alone, with the interface the training loop asks of a model;
    `frozen_backbone`: the parameters of the backbone that computed its features (the loop
    reports them as frozen)."""

    def __init__(self, fc: nn.Linear, frozen_backbone: int = 0):
        super().__init__()
        self.fc, self.frozen_backbone = fc, frozen_backbone

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class FeatureBatches:
    """Training batches and validation split of cached, standardised features."""

    def __init__(self, train_f: np.ndarray, val_f: np.ndarray, val_y: np.ndarray, device):
        self.f = torch.from_numpy(train_f).to(device)
        self.val_f, self.val_y = torch.from_numpy(val_f).to(device), val_y

    def batch(self, idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        return self.f[torch.from_numpy(idx).to(self.f.device)]

    def epoch(self, batches: list[np.ndarray], gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, their indices on the device) for each batch of indices."""
        for at in device_indices(batches, self.f.device):
            yield self.f[at], at

    @torch.no_grad()
    def val_logits(self, head: nn.Module) -> torch.Tensor:
        was_training = head.training
        head.eval()
        logits = head(self.val_f).float().cpu()
        head.train(was_training)
        return logits


def fold_standardization(fc: nn.Linear, mean: np.ndarray, std: np.ndarray) -> dict[str, torch.Tensor]:
    """The weights of `fc` trained on (f - mean) / std, as weights for raw features f:
    W' = W / std, b' = b - W' · mean (computed in float64)."""
    w = fc.weight.detach().double() / torch.from_numpy(std).double()
    b = fc.bias.detach().double() - w @ torch.from_numpy(mean).double()
    return {"weight": w.to(fc.weight.dtype), "bias": b.to(fc.bias.dtype)}


def fit_head(fc: nn.Linear, data: FeatureBatches, y: np.ndarray, cfg: TrainConfig, l2: float,
             on_epoch=None, progress: bool = False, frozen_backbone: int = 0) -> TrainResult:
    """A copy of `fc`, trained on the cached features with L2 strength `l2` on its weights."""
    head = _Head(nn.Linear(fc.in_features, fc.out_features), frozen_backbone).to(fc.weight.device)
    head.fc.load_state_dict(fc.state_dict())  # the neutral (zero) start
    optimizer = "adam" if cfg.train.optimizer == "adamw" else cfg.train.optimizer  # coupled L2: in the loss
    head_cfg = replace(cfg, strategy=Strategy(), resume_path=None,  # the head alone: all of it trains
                       train=cfg.train.model_copy(update={"optimizer": optimizer, "weight_decay": l2, "compile": False,
                                                          "mixup_alpha": 0.0, "cutmix_alpha": 0.0}))
    return fit(head, y, data, head_cfg, on_epoch, progress)


def pick_l2(fc: nn.Linear, data: FeatureBatches, y: np.ndarray, cfg: TrainConfig, progress: bool) -> float:
    """The λ of L2_GRID whose head has the lowest validation log loss; for labels
    (task=multilabel), the highest validation mAP: the log loss of a head trained with the
    asymmetric loss is not what it optimised (measured on CIFAR mosaics: λ by log loss gave that
    head a test mAP of 0.678, by mAP 0.734; a BCE head: 0.730 either way)."""
    by_map = cfg.multilabel
    key, what = ("best_val_map", "val mAP") if by_map else ("best_val_loss", "val log loss")
    scores = {l2: fit_head(fc, data, y, cfg, l2).metrics[key] for l2 in L2_GRID}
    best = (max if by_map else min)(scores, key=scores.get)
    if progress:
        print(f"train: probe L2 λ = {best:g}, picked on {what} from "
              + ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items()), flush=True)
    return best


def train_linear_probe(model: nn.Module, train_xy, val_xy, prep: Preprocessing, cfg: TrainConfig,
                       on_epoch=None, progress: bool = True) -> TrainResult:
    """Train only the head of `model` on cached features of its frozen backbone; return the
    result of the whole model (backbone unchanged, the best head) like `pipeline.training.loop.train`."""
    set_threads(cfg.train.num_threads)
    model.to(torch.device(cfg.device)).to(memory_format=torch.channels_last)  # oneDNN's fast layout on CPU too
    (x, y), (val_x, val_y) = train_xy, val_xy
    started = time.perf_counter()
    passes = max(1, cfg.strategy.augmented_passes)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train_f = np.concatenate([extract_features(model, x, prep, cfg if cfg.strategy.augmented_passes else None, gen,
                                               f"features: train, pass {p + 1}/{passes}") for p in range(passes)])
    val_f = extract_features(model, val_x, prep, desc="features: val")
    extract_seconds = time.perf_counter() - started
    if progress:
        n = len(x) * passes + len(val_x)
        print(f"train: features of {n:,} images ({train_f.shape[1]} each) through the frozen backbone in "
              f"{extract_seconds:.1f} s ({n / extract_seconds:.0f} images/s); training the head on them", flush=True)
    mean, std = train_f.mean(0, dtype=np.float64), train_f.std(0, dtype=np.float64) + 1e-6
    standardize = lambda f: ((f - mean) / std).astype(np.float32)  # noqa: E731
    fc = head_of(model)
    data = FeatureBatches(standardize(train_f), standardize(val_f), val_y, fc.weight.device)
    y_all = np.tile(np.asarray(y), (passes,) + (1,) * (np.ndim(y) - 1))  # k-hot rows: whole rows repeated
    l2 = cfg.strategy.probe_l2
    l2 = pick_l2(fc, data, y_all, cfg, progress) if l2 == "auto" else float(l2)
    frozen = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in fc.parameters())
    result = fit_head(fc, data, y_all, cfg, l2, on_epoch, progress, frozen)
    fc.load_state_dict(fold_standardization(_loaded(fc, result.best_state), mean, std))
    result.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    result.metrics["probe_l2"] = l2
    images = len(x) * passes + len(val_x)
    # what a person compares with other runs: the whole stage's training time, and the backbone's
    # throughput (the head's steps on cached features run at thousands of "images"/s: not a speed)
    result.timing |= {"head_seconds": result.timing["train_seconds"], "feature_seconds": extract_seconds,
                      "feature_images_per_second": images / extract_seconds,
                      "train_seconds": time.perf_counter() - started,
                      "train_images_per_second": images / extract_seconds}
    return result


def _loaded(fc: nn.Linear, head_state: dict) -> nn.Linear:
    out = nn.Linear(fc.in_features, fc.out_features)
    out.load_state_dict({k.removeprefix("fc."): v for k, v in head_state.items()})
    return out
