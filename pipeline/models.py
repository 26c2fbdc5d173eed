"""The model registry: a name → a `torch.nn.Module` with `num_classes` outputs.

- `original`: our own small CNN (below), for learning and fast CPU runs.
- `alexnet`: torchvision's AlexNet (timm has none); its head is the *last* Linear of
  `classifier`, which is the one re-made for the data set's classes.
- any timm model name (`resnet18`, `efficientnet_b0`, `convnext_tiny`, ...): built by timm,
  which re-makes the head itself (`num_classes`) and takes `drop_rate` / `drop_path_rate`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from pipeline.errors import UserError


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU ×2 + max-pool blocks (widths w, 2w, 4w), global average pooling,
    dropout, linear head. ~0.29 M parameters at width 32; works at any input size ≥ 8 px."""

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


@dataclass(frozen=True)
class Entry:
    build: Callable[..., nn.Module]
    min_image_size: int
    description: str


def _original(num_classes: int, in_chans: int = 3, drop_rate: float | None = None, **kwargs: Any) -> nn.Module:
    if drop_rate is not None:
        kwargs["dropout"] = drop_rate
    return SmallCNN(num_classes, in_chans, **kwargs)


def _alexnet(num_classes: int, in_chans: int = 3, drop_rate: float | None = None, **_: Any) -> nn.Module:
    from torchvision.models import alexnet

    assert in_chans == 3, "AlexNet takes 3-channel input"
    model = alexnet(weights=None, num_classes=num_classes, dropout=0.5 if drop_rate is None else drop_rate)
    return model


# Our own entries by name; every other name goes to timm.
REGISTRY: dict[str, Entry] = {
    "original": Entry(_original, 8, "our small CNN (0.29 M params), fast on a CPU"),
    "alexnet": Entry(_alexnet, 63, "torchvision AlexNet (57 M params at 10 classes), needs ≥ 63 px"),
}


def head_of(model: nn.Module) -> nn.Module:
    """The final classifier layer (what transfer learning re-makes)."""
    if isinstance(model, SmallCNN):
        return model.head
    if hasattr(model, "get_classifier"):  # timm
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]  # AlexNet: classifier[6], the last Linear, not the first


def _timm_names(pattern: str = "") -> list[str]:
    import timm

    return timm.list_models(pattern or "*")


def model_name_problem(name: str) -> str | None:
    """None for a name in the registry or in timm; else what is wrong, with close matches."""
    if name in REGISTRY:
        return None
    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, list(REGISTRY) + _timm_names(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "list them with: python -m pipeline models"
    return f"unknown model; use one of {', '.join(REGISTRY)} or a timm model name ({hint})"


def min_image_size(name: str) -> int:
    """The smallest input a model accepts (AlexNet's fixed pooling needs 63 px)."""
    return REGISTRY[name].min_image_size if name in REGISTRY else 8


def check_model_name(name: str) -> None:
    if problem := model_name_problem(name):
        raise UserError(f"model={name!r}: {problem}")


def list_models(pattern: str = "") -> list[str]:
    """Registry names and timm names matching a glob pattern (`resnet*`)."""
    import fnmatch

    ours = [n for n in REGISTRY if not pattern or fnmatch.fnmatch(n, pattern)]
    return ours + _timm_names(pattern)


def build_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A freshly initialised model (weights from the current torch RNG state)."""
    check_model_name(name)
    if name in REGISTRY:
        return REGISTRY[name].build(num_classes=num_classes, in_chans=in_chans, **kwargs)
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
