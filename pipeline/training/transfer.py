"""Which parameters train, as the run's `Strategy` says (`pipeline.training.strategy`), and
BatchNorm layers that keep their statistics."""
from __future__ import annotations

from torch import nn

from pipeline.core.errors import UserError
from pipeline.models import head_parameter_names, stage_prefixes
from pipeline.training.strategy import Strategy


def trainable_names(model: nn.Module, strategy: Strategy, epoch: int) -> set[str]:
    """Names of the parameters that train in `epoch` (1-based) under `strategy`."""
    names = [n for n, _ in model.named_parameters()]
    trains = strategy.trains(epoch)
    if trains == "all":
        return set(names)
    head = head_parameter_names(model)
    if trains == "head":
        return head
    starts = [next((i for i, n in enumerate(names) if n.startswith(p + ".")), None) for p in stage_prefixes(model)]
    starts = [i for i in starts if i is not None]
    stages = strategy.unfreeze_stages
    if stages > len(starts):
        raise UserError(f"transfer.unfreeze_stages={stages}: this model has {len(starts)} stages")
    first = starts[len(starts) - stages] if stages else len(names)
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
