"""The model registry: a name → a `torch.nn.Module` with `num_classes` outputs.

- `original`: our own small CNN (below), for learning and fast CPU runs.
- any timm model name (`resnet18`, `efficientnet_b0`, ...), built from scratch by timm.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from torch import nn

from pipeline.errors import UserError


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU ×2 + max-pool blocks (widths w, 2w, 4w), global average pooling,
    dropout, linear head. ~0.3 M parameters at width 32; works at any input size ≥ 8 px."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_chans
        for out in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(chans, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                chans = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def _original(num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    return SmallCNN(num_classes, in_chans, **kwargs)


# Our own models by name; every other name goes to timm.
REGISTRY: dict[str, Callable[..., nn.Module]] = {"original": _original}


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def model_name_problem(name: str) -> str | None:
    """None for a name in the registry or in timm; else what is wrong, with close matches."""
    if name in REGISTRY:
        return None
    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, list(REGISTRY) + _timm_names(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for timm names"
    return f"unknown model; use one of {', '.join(REGISTRY)} or a timm model name ({hint})"


def check_model_name(name: str) -> None:
    if problem := model_name_problem(name):
        raise UserError(f"model={name!r}: {problem}")


def build_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A freshly initialised model (weights from the current torch RNG state)."""
    check_model_name(name)
    if name in REGISTRY:
        return REGISTRY[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
