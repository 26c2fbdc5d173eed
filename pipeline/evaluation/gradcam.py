"""Grad-CAM (Selvaraju et al., 2017): which part of an image a CNN's decision rests on.

The heat map of class c is ReLU(Σ_k α_k A_k), where A is the last spatial feature map and
α_k the mean over positions of ∂(logit c)/∂A_k, upsampled to the image and scaled to [0, 1].
Written here with autograd (about 40 lines) rather than taken from the `grad-cam` package,
which would pull in OpenCV for the same few lines.

Target layer: the model's `forward_features` output, the last spatial feature map, which
`forward_head` pools into the logits (every model in the registry offers both: timm's own,
ours and AlexNet taking the map *before* their final max-pool, for twice the resolution).
NCHW or NHWC (timm's `output_fmt`, Swin). A model whose features are tokens, not a map
(vision transformers), has none: `split_model` returns None and the caller skips Grad-CAM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.preprocess import Preprocessing
from pipeline.evaluation.figures import gradcam_grid
from pipeline.evaluation.metrics import gradcam_sample
from pipeline.plots import note_figure

Split = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], bool]


def split_model(model: nn.Module, image_size: int) -> Split | None:
    """Split `model` into (image → feature map, feature map → logits, channels_last), or None
    when it has no spatial feature map to explain at this input size."""
    channels_last = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
    was_training = model.training
    with torch.no_grad():  # in eval mode: a probe must not move BatchNorm statistics
        probe = model.eval().forward_features(torch.zeros(1, 3, image_size, image_size,
                                                          device=next(model.parameters()).device))
    model.train(was_training)
    return (model.forward_features, model.forward_head, channels_last) if probe.ndim == 4 else None


def grad_cam(model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None,
             split: Split | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Heat maps (N×H×W in [0, 1], the size of `x`) for normalised images `x` (N×3×H×W) and
    the logits. `targets`: the class to explain per image; default the predicted one."""
    split = split or split_model(model, x.shape[-1])
    if split is None:
        raise ValueError(f"{type(model).__name__} has no spatial feature map for Grad-CAM")
    features, head, channels_last = split
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)  # a graph to differentiate even if the weights are frozen
        fmap = features(x)
        logits = head(fmap)
        targets = logits.argmax(1) if targets is None else targets.to(logits.device)
        (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), fmap)
    model.train(was_training)
    if channels_last:
        fmap, grads = fmap.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * fmap).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return cam.cpu(), logits.detach().cpu()


def gradcam_figure(model: nn.Module, images: np.ndarray, y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                   prep: Preprocessing, path: Path) -> str | None:
    """Draw Grad-CAM into `path` for some correctly classified test images of each class and
    the most confident mistakes (stored uint8 N×3×S×S; `probs`: the model's N×K test
    probabilities), each explaining the predicted class. A model with no spatial feature map
    gets a picture saying so; the note is also returned."""
    split = split_model(model, prep.image_size)
    if split is None:
        note = f"Grad-CAM skipped: {type(model).__name__} has no spatial feature map (e.g. a vision transformer)"
        note_figure(note, path)
        return note
    idx, mistakes = gradcam_sample(y_true, probs)
    picked = np.array(prep.center_crop(images[idx]))
    pred, conf = probs[idx].argmax(1), probs[idx].max(1)
    device = next(model.parameters()).device
    heat, _ = grad_cam(model, prep.normalize(torch.from_numpy(picked).to(device)), torch.from_numpy(pred), split)
    titles = [f"{classes[t]} → {classes[p]} ({c:.2f})" if m else f"{classes[t]} ✓ ({c:.2f})"
              for t, p, c, m in zip(y_true[idx], pred, conf, mistakes)]
    gradcam_grid(picked, heat.numpy(), titles, mistakes, path)
    return None
