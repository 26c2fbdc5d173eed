"""What the model is trained to predict, in the few places the training loop needs to know:
one class per image (softmax, cross-entropy, accuracy) or, with task=multilabel, any number of
labels (a sigmoid per label, binary cross-entropy with each label's positive weight, label-wise
accuracy, and the mean average precision over labels on validation)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


ASL_GAMMA_NEG, ASL_GAMMA_POS, ASL_CLIP = 4.0, 0.0, 0.05  # the asymmetric loss's settings (the paper's defaults)


@dataclass(frozen=True)
class Objective:
    multilabel: bool = False
    asymmetric: bool = False  # multilabel: the asymmetric loss instead of binary cross-entropy

    def targets(self, y: np.ndarray, device) -> torch.Tensor:
        """The labels on the device: class indices (int64), or k-hot rows as float32."""
        t = torch.from_numpy(np.asarray(y))
        return (t.float() if self.multilabel else t).to(device)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
             smoothing: float) -> torch.Tensor:
        """Cross-entropy (`weight`: per class), or binary cross-entropy per label (`weight`: each
        label's positive weight; smoothing moves the targets to ε/2 and 1 − ε/2)."""
        if not self.multilabel:
            return F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
        if smoothing:
            target = target * (1.0 - smoothing) + smoothing / 2.0
        if self.asymmetric:
            return asymmetric_loss(logits, target, weight)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)

    def correct(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Right answers in the batch, as a float64 sum: images whose top class is the label
        (soft MixUp targets: their largest share), or for labels the fraction of labels each
        image gets right at probability 0.5."""
        if self.multilabel:
            return ((logits > 0) == (target >= 0.5)).double().mean(dim=1).sum()
        hard = target.argmax(1) if target.ndim == 2 else target
        return (logits.argmax(1) == hard).double().sum()

    def val_metrics(self, logits: torch.Tensor, y: np.ndarray) -> dict:
        """val_loss and val_accuracy (label-wise for labels) and, for labels, val_map: the mean
        over labels with a positive of scikit-learn's average precision."""
        t = self.targets(y, "cpu")
        logits = logits.float()
        if not self.multilabel:
            return {"val_loss": float(F.cross_entropy(logits, t)), "val_accuracy": float((logits.argmax(1) == t).float().mean())}
        return {"val_loss": float(F.binary_cross_entropy_with_logits(logits, t)),
                "val_accuracy": float(((logits > 0) == (t >= 0.5)).float().mean()),
                "val_map": mean_average_precision(np.asarray(y), logits.numpy())}


def asymmetric_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The asymmetric loss (Ridnik et al. 2021, "Asymmetric Loss For Multi-Label Classification"):
    positives' log-likelihood weighted by (1 − p)^γ+, negatives' by p_m^γ− with the shifted
    probability p_m = max(p − clip, 0), so easy negatives (most of them, with many labels) count
    less and the easiest not at all; `pos_weight` scales the positives' term as BCE's does."""
    p = torch.sigmoid(logits)
    p_m = (p - ASL_CLIP).clamp(min=0)
    pos = target * F.logsigmoid(logits)
    if ASL_GAMMA_POS:
        pos = pos * (1 - p).pow(ASL_GAMMA_POS)
    if pos_weight is not None:
        pos = pos * pos_weight
    neg = (1 - target) * p_m.pow(ASL_GAMMA_NEG) * torch.log((1 - p_m).clamp(min=1e-8))
    return -(pos + neg).mean()


def mean_average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Macro mean average precision over the labels that have a positive in `y`."""
    from sklearn.metrics import average_precision_score

    has = np.asarray(y).sum(axis=0) > 0
    if not has.any():
        return float("nan")
    return float(average_precision_score(np.asarray(y)[:, has], scores[:, has], average="macro"))


def positive_weights(y: np.ndarray) -> list[float]:
    """Each label's positive weight for `class_weights: balanced`: negatives / positives (a label
    with no positive: 1), so each label's positives weigh as much as its negatives."""
    pos = np.asarray(y).sum(axis=0).astype(np.float64)
    neg = len(y) - pos
    return [float(n / p) if p else 1.0 for p, n in zip(pos, neg)]


class LabelMixer:
    """MixUp / CutMix for k-hot labels (torchvision's take class indices only): one λ per batch
    from Beta(α, α), each image mixed with another of the batch, the label rows mixed by the
    same λ (CutMix: by the area actually pasted). Both on: each batch picks one."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float):
        self.alphas = [("mixup", mixup_alpha)] * bool(mixup_alpha) + [("cutmix", cutmix_alpha)] * bool(cutmix_alpha)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind, alpha = self.alphas[int(torch.randint(len(self.alphas), ()))] if len(self.alphas) > 1 else self.alphas[0]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(len(x), device=x.device)
        if kind == "mixup":
            return lam * x + (1.0 - lam) * x[perm], lam * y + (1.0 - lam) * y[perm]
        h, w = x.shape[-2:]
        ch, cw = int(h * (1.0 - lam) ** 0.5), int(w * (1.0 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
        return x, lam * y + (1.0 - lam) * y[perm]
