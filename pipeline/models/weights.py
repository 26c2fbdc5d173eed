"""Weights for transfer learning: where they come from and the preprocessing they bring.

`pretrained: true` (timm's hub, torchvision for AlexNet), or `weights:` a local file: a
timm/torchvision state dict (.pth/.safetensors) or one of our own checkpoints. Either way the
head is re-made for this data set's classes and starts neutral (zero), and the weights bring
their preprocessing (`resolve_preprocessing`). Which parameters then train is
`pipeline.training.transfer`'s business.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.core.preprocess import INTERPOLATIONS, Preprocessing, stored_size_for
from pipeline.models.registry import build_model, head_parameter_names, min_image_size, pretrained_cfg, reset_head

# ---------------------------------------------------------------- weights files


def _torch_load(path: Path):
    if not path.is_file():
        raise UserError(f"weights={str(path)!r}: no such file; give the path of a .pth/.safetensors state dict "
                        "or of a models/model.pt checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise UserError(f"weights={str(path)!r} is not a readable safetensors file ({type(exc).__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise UserError(f"weights={str(path)!r} is not a readable state dict ({type(exc).__name__})") from None


def is_our_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "arch" in obj and "preprocessing" in obj


def read_weights(path: Path) -> tuple[dict, Preprocessing | None]:
    """(state dict, the preprocessing recorded in it: our checkpoints only, else None)."""
    obj = _torch_load(path)
    if is_our_checkpoint(obj):
        return obj["state_dict"], Preprocessing.from_dict(obj["preprocessing"])
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"], None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights={str(path)!r} holds no state dict (a mapping of tensor names to tensors)")
    return obj, None


# ---------------------------------------------------------------- preprocessing


def resolve_preprocessing(model: str, pretrained: bool, weights: str | None, image_size: int | str,
                          resize: str) -> Preprocessing:
    """The preprocessing a run uses: the weights' own (pretrained config, or a checkpoint's
    record) when weights are loaded, else the data set's statistics (filled in by prepare).
    `image_size: auto` is the weights' input size, or 32 (the model's minimum if larger)
    from scratch; an explicit size wins, with the weights' crop ratio kept."""
    if weights:
        _, recorded = read_weights(Path(weights))
        if recorded is not None:
            size = recorded.image_size if image_size == "auto" else int(image_size)
            return Preprocessing(size, stored_size_for(size, recorded.crop_pct), recorded.resize,
                                 recorded.interpolation, recorded.mean, recorded.std, f"checkpoint:{weights}",
                                 f"the preprocessing recorded in the checkpoint {weights} (weights: our checkpoint)")
    if weights or pretrained:
        return _pretrained_preprocessing(model, "weights: a state dict file" if weights else "pretrained: true",
                                         image_size, resize)
    size = auto_size(model) if image_size == "auto" else int(image_size)
    return Preprocessing(size, size, resize, "bilinear", None, None, "data",
                         "the training split's own mean/std, because the model trains from scratch")


def _pretrained_preprocessing(model: str, why: str, image_size: int | str, resize: str) -> Preprocessing:
    """timm's `resolve_data_config` of the weights' pretrained config (AlexNet's too, written in
    timm's format) gives mean, std, input size, crop_pct and filter; kept here: the `resize`
    policy (timm's `crop_mode` is not applied), the filter limited to the two our resize has, and
    whose weights they are, for the reason line."""
    cfg = pretrained_cfg(model)
    if cfg is None:
        raise UserError(f"model={model!r} has no pretrained configuration; train it from scratch "
                        "(pretrained: false, weights: null) or give one of our checkpoints as weights")
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg)
    size = data["input_size"][-1] if image_size == "auto" else int(image_size)
    interpolation = data["interpolation"] if data["interpolation"] in INTERPOLATIONS else "bilinear"
    name = cfg.get("description") or f"timm {cfg['architecture']}" + (f".{cfg['tag']}" if cfg.get("tag") else "")
    mean, std, crop_pct = tuple(data["mean"]), tuple(data["std"]), data["crop_pct"]
    return Preprocessing(size, stored_size_for(size, crop_pct), resize, interpolation, mean, std, f"pretrained:{model}",
                         f"the pretrained config of {name} (mean {_fmt(mean)}, std {_fmt(std)}, "
                         f"crop_pct {crop_pct:g}), because {why}")


def auto_size(model: str) -> int:
    """`image_size: auto` from scratch: 32, or the model's minimum rounded up to a power of 2."""
    need = min_image_size(model)
    return 32 if need <= 32 else 1 << (need - 1).bit_length()


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


# ---------------------------------------------------------------- the model


def load_matching(model: nn.Module, state: dict, source: str) -> list[str]:
    """Copy every tensor whose name and shape match, except the head's (other classes).
    Returns the names loaded; fails when nothing of the backbone matched."""
    own = model.state_dict()
    head = head_parameter_names(model)
    state = _resized_position_embedding(model, state)
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and k not in head}
    if not loadable:
        raise UserError(f"{source}: none of its tensors fit this model (another architecture?)")
    model.load_state_dict(loadable, strict=False)
    return sorted(loadable)


def _resized_position_embedding(model: nn.Module, state: dict) -> dict:
    """A ViT-style model built for another image size (timm's `img_size`) has a position
    embedding of another grid: the weights' one is resampled to it (timm's own function, as
    timm does when it builds a pretrained ViT at another size), not dropped."""
    own, theirs = getattr(model, "pos_embed", None), state.get("pos_embed")
    if not isinstance(own, torch.Tensor) or theirs is None or own.shape == theirs.shape or own.ndim != 3:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    grid = tuple(model.patch_embed.grid_size)
    return state | {"pos_embed": resample_abs_pos_embed(theirs, new_size=list(grid), num_prefix_tokens=prefix)}


def _hub_state(name: str) -> dict:
    """ImageNet weights from timm's hub (torchvision for AlexNet), with the weights' own head;
    offline: one line."""
    try:
        return build_model(name, num_classes=None, pretrained=True).state_dict()
    except (OSError, RuntimeError, ValueError) as exc:  # hub/URL unreachable, offline, missing file
        raise UserError(
            f"cannot get pretrained weights for {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            f"offline, download them elsewhere and set weights: PATH to the file") from None


def _hub_source(name: str) -> tuple[list[Path], str]:
    """(where `pretrained: true`'s weights of `name` are once downloaded, the host they come from)."""
    import torch.hub

    cfg = pretrained_cfg(name)
    if cfg.get("hf_hub_id"):  # timm prefers the Hugging Face hub: model.safetensors, else pytorch_model.bin
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        found = [try_to_load_from_cache(repo, f, revision=revision or None) for f in files]
        return [Path(f) for f in found if isinstance(f, str)], urlparse(constants.ENDPOINT).hostname or ""
    url = cfg["url"]  # a torch.hub download (torchvision's AlexNet too): kept in its checkpoints folder
    return [Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name], urlparse(url).hostname or url


def fetch_pretrained(name: str) -> str:
    """Make sure `pretrained: true` finds `name`'s weights: in the local hub cache, or downloaded
    into it now (at check time, before prepare touches anything). The hub libraries retry an
    unreachable host for ~50 s, so the host is tried once first (5 s) and an unreachable one is
    one line. Returns what was done, for the check's message."""
    cached, host = _hub_source(name)
    if any(p.is_file() for p in cached):
        return "in the local cache"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    problem = "HF_HUB_OFFLINE is set" if offline else _unreachable(host)
    if problem:
        raise UserError(f"pretrained=true: the ImageNet weights of {name} are not in the local cache and cannot be "
                        f"downloaded ({problem}); connect to the internet once, or download them elsewhere and set "
                        "weights: PATH to the file (pretrained: false)")
    _hub_state(name)  # downloads into the cache, where train finds them
    return f"downloaded from {host}"


def _unreachable(host: str, port: int = 443) -> str | None:
    """Why `host` cannot be reached (a direct connection, 5 s); None when it can, or when a proxy
    is set (the download then goes through it and says for itself)."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return f"{host} unreachable: {exc.strerror or exc}"
    return None


def build_transfer_model(name: str, num_classes: int, pretrained: bool, weights: str | None,
                         arch_kwargs: dict) -> tuple[nn.Module, bool]:
    """The model, with backbone weights loaded and a neutral new head when `weights` or
    `pretrained` bring them; returns (model, whether weights were loaded)."""
    model = build_model(name, num_classes=num_classes, **arch_kwargs)
    if not (weights or pretrained):
        return model, False
    if weights:
        state, _ = read_weights(Path(weights))
        source = f"weights={weights!r}"
    else:
        if pretrained_cfg(name) is None:
            raise UserError(f"model={name!r} has no pretrained weights; use pretrained: false or a timm model")
        state, source = _hub_state(name), f"pretrained {name}"
    loaded = load_matching(model, state, source)
    reset_head(model)
    print(f"train: loaded {len(loaded)} of {len(model.state_dict())} tensors from {source.split('=', 1)[-1]}; "
          f"head re-made for {num_classes} classes, starting at zero", flush=True)
    return model, True
