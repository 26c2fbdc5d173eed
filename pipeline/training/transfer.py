"""Which parameters train, per transfer strategy (`finetune`):
- `full`: everything trains (the backbone at lr × backbone_lr_mult when weights were loaded).
- `linear_probe`: only the new head trains; the backbone is frozen, its BatchNorm statistics too
  (the train stage then trains the head on cached features: `pipeline.training.probe`).
- `partial`: the last `unfreeze_stages` stages of the backbone and the head train.
- `two_phase`: `head_epochs` epochs of linear probing, then everything trains, the backbone
  at lr × backbone_lr_mult.
"""
from __future__ import annotations

from torch import nn

from pipeline.errors import UserError
from pipeline.models import head_parameter_names, stage_prefixes

STRATEGIES = ("full", "linear_probe", "partial", "two_phase")


def trainable_names(model: nn.Module, strategy: str, unfreeze_stages: int, epoch: int, head_epochs: int) -> set[str]:
    """Names of the parameters that train in `epoch` (1-based) under `strategy`."""
    names = [n for n, _ in model.named_parameters()]
    head = head_parameter_names(model)
    if strategy == "full" or (strategy == "two_phase" and epoch > head_epochs):
        return set(names)
    if strategy in ("linear_probe", "two_phase"):
        return head
    starts = [next((i for i, n in enumerate(names) if n.startswith(p + ".")), None) for p in stage_prefixes(model)]
    starts = [i for i in starts if i is not None]
    if unfreeze_stages > len(starts):
        raise UserError(f"transfer.unfreeze_stages={unfreeze_stages}: this model has {len(starts)} stages")
    first = starts[len(starts) - unfreeze_stages] if unfreeze_stages else len(names)
    return set(names[first:]) | head


def apply_trainable(model: nn.Module, trainable: set[str]) -> int:
    """Set requires_grad; return the number of trainable parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_batchnorm_stats(model: nn.Module, everywhere: bool = False) -> None:
    """Put every BatchNorm layer whose parameters are all frozen (`everywhere`: every one) in
    eval mode (call after `model.train()`), so it keeps its running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if everywhere or (params and not any(p.requires_grad for p in params)):
                m.eval()
