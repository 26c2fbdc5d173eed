"""Transfer learning: pretrained weights (hub or a local file) and which parameters train.

Strategies (`finetune`):
- `full`: everything trains (the backbone at lr × backbone_lr_mult).
- `linear_probe`: only the new head trains; the backbone is frozen, its BatchNorm statistics too.
- `partial`: the last `unfreeze_stages` stages of the backbone and the head train.
- `two_phase`: `head_epochs` epochs of linear probing, then everything trains, the backbone
  at lr × backbone_lr_mult.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import SmallCNN, build_model, head_of

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STRATEGIES = ("full", "linear_probe", "partial", "two_phase")


# ---------------------------------------------------------------- weights


def _is_timm(name: str) -> bool:
    from pipeline.models import REGISTRY

    return name not in REGISTRY


def pretrained_preprocessing(model: nn.Module, name: str) -> dict | None:
    """mean/std/input size of a model's pretrained config (timm), ImageNet's for AlexNet."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        return {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": int(cfg["input_size"][-1])}
    if name == "alexnet":
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_size": 224}
    return None


def _load_state(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"weights={str(path)!r}: no such file; give the path of a .pth/.safetensors state dict "
                        "or of a models/model.pt checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise UserError(f"weights={str(path)!r} is not a readable state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and "arch" in state:  # a checkpoint of ours
        return state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        return state["model"]
    return state


def load_matching(model: nn.Module, state: dict, source: str) -> list[str]:
    """Copy every tensor whose name and shape match; the head (other classes) is left new.
    Returns the names loaded; fails when nothing of the backbone matched."""
    own = model.state_dict()
    head_names = {f"{n}" for n, p in model.named_parameters() if any(p is q for q in head_of(model).parameters())}
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and k not in head_names}
    if not [k for k in loadable if k not in head_names]:
        raise UserError(f"{source}: none of its tensors fit this model (another architecture?)")
    model.load_state_dict(loadable, strict=False)
    return sorted(loadable)


def build_transfer_model(name: str, num_classes: int, pretrained: bool, weights: str | None,
                         arch_kwargs: dict) -> tuple[nn.Module, dict | None]:
    """The model with backbone weights loaded (head new), and the pretrained preprocessing
    (None when training from scratch)."""
    model = build_model(name, num_classes=num_classes, **arch_kwargs)
    if weights:
        loaded = load_matching(model, _load_state(Path(weights)), f"weights={weights!r}")
        print(f"train: loaded {len(loaded)} tensors from {weights}; head re-made for {num_classes} classes")
        return model, pretrained_preprocessing(model, name) if pretrained else None
    if not pretrained:
        return model, None
    try:
        if _is_timm(name):
            import timm

            ref = timm.create_model(name, pretrained=True)
        elif name == "alexnet":
            from torchvision.models import AlexNet_Weights, alexnet

            ref = alexnet(weights=AlexNet_Weights.IMAGENET1K_V1)
        else:
            raise UserError(f"model={name!r} has no pretrained weights; use pretrained: false or a timm model")
    except (OSError, RuntimeError, ValueError) as exc:  # hub/URL unreachable, offline, missing file
        raise UserError(
            f"cannot get pretrained weights for {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            f"offline, download them elsewhere and set weights: PATH to the file") from None
    load_matching(model, ref.state_dict(), f"pretrained {name}")
    return model, pretrained_preprocessing(ref, name)


# ---------------------------------------------------------------- what trains


def _stage_prefixes(model: nn.Module) -> list[str]:
    if isinstance(model, SmallCNN):
        return ["features.0", "features.7", "features.14"]
    if hasattr(model, "feature_info"):  # timm
        return [f["module"] for f in model.feature_info]
    return ["features.0", "features.3", "features.6", "features.8", "features.10", "classifier.1", "classifier.4"]


def head_parameter_names(model: nn.Module) -> set[str]:
    head = {id(p) for p in head_of(model).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in head}


def trainable_names(model: nn.Module, strategy: str, unfreeze_stages: int, epoch: int, head_epochs: int) -> set[str]:
    """Names of the parameters that train in `epoch` (1-based) under `strategy`."""
    names = [n for n, _ in model.named_parameters()]
    head = head_parameter_names(model)
    if strategy == "full" or (strategy == "two_phase" and epoch > head_epochs):
        return set(names)
    if strategy in ("linear_probe", "two_phase"):
        return head
    starts = [next((i for i, n in enumerate(names) if n.startswith(p + ".")), None) for p in _stage_prefixes(model)]
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


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every norm layer whose parameters are all frozen in eval mode (call after
    `model.train()`), so frozen parts keep their running statistics too."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
