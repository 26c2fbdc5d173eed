"""The model registry: a name → a model offering timm's interface, and that model's rules.

- `original`: our own small CNN (`pipeline.models.small_cnn`), for learning and fast CPU runs.
- `alexnet`: torchvision's AlexNet (timm has none); its head is the *last* Linear of
  `classifier`, which is the one re-made for the data set's classes.
- `resnet9`: David Page's ResNet-9 (Myrtle.ai, DAWNBench 2018), the fast CIFAR network: 94 % on
  CIFAR-10 in 24 epochs (`pipeline.models.resnet9` has the figures and the recipe).
- any timm model name (`resnet18`, `efficientnet_b0`, `convnext_tiny`, ...): built by timm,
  which re-makes the head itself (`num_classes`) and takes `drop_rate` / `drop_path_rate`.

Every model offers timm's interface, so the rest of the pipeline asks the model, not its type:
`get_classifier()` (the head transfer learning re-makes), `feature_info` (its stages, for
partial unfreezing), `forward_features(x)` (the last
spatial feature map: Grad-CAM explains it) and `forward_head(fmap, pre_logits=False)` (pooling
to the penultimate features: the linear probe caches them). Ours take timm's keywords
(`num_classes`, `in_chans`, `drop_rate`) and describe their weights in timm's format, so
`build_model` and `pretrained_cfg` answer for any name; what timm does not know of a model
(minimum input size, BatchNorm or not: its default learning rate) is its row in `REGISTRY`.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.core.errors import UserError
from pipeline.core.preprocess import MIN_IMAGE_SIZE
from pipeline.models.resnet9 import ResNet9
from pipeline.models.small_cnn import SmallCNN

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _alexnet_class() -> type[nn.Module]:
    from torchvision.models import AlexNet as TorchvisionAlexNet

    class AlexNet(TorchvisionAlexNet):
        """torchvision's AlexNet (same modules, same state-dict names) with timm's interface."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # the stages partial unfreezing counts from the end: 5 convolutions, 2 hidden Linears
            self.feature_info = [dict(module=m) for m in ("features.0", "features.3", "features.6", "features.8",
                                                          "features.10", "classifier.1", "classifier.4")]

        def get_classifier(self) -> nn.Module:
            return self.classifier[-1]  # the last Linear, not the first

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.features[:-1](x)  # before the last max-pool, as for SmallCNN

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            x = self.classifier[:-1](torch.flatten(self.avgpool(self.features[-1](x)), 1))
            return x if pre_logits else self.classifier[-1](x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(x))

    return AlexNet


def _alexnet(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5, pretrained: bool = False,
             **_: Any) -> nn.Module:
    """`pretrained`: torchvision's ImageNet weights, loaded over a random initialisation as
    torchvision's `alexnet(weights=...)` does, so the same random numbers are drawn."""
    assert in_chans == 3, "AlexNet takes 3-channel input"
    model = _alexnet_class()(num_classes=num_classes, dropout=drop_rate)
    if pretrained:
        from torchvision.models import AlexNet_Weights

        model.load_state_dict(AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True))
    return model


def _alexnet_pretrained_cfg() -> dict:
    """torchvision's AlexNet_Weights.IMAGENET1K_V1 in timm's terms; its transforms(): resize 256,
    centre crop 224, bilinear. `description` names them (timm's own configs leave it empty)."""
    from torchvision.models import AlexNet_Weights

    return {"url": AlexNet_Weights.IMAGENET1K_V1.url, "description": "torchvision AlexNet_Weights.IMAGENET1K_V1",
            "input_size": (3, 224, 224), "crop_pct": 224 / 256, "interpolation": "bilinear",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Entry:
    """A model's rules beyond what timm knows of it: a row of `REGISTRY` for ours; a timm name
    gets the defaults (`entry()`)."""
    build: Callable[..., nn.Module] | None = None         # ours: its constructor; None: timm.create_model
    min_image_size: int = MIN_IMAGE_SIZE                   # the smallest input it accepts
    description: str = "timm"                              # for `pipeline models`
    pretrained_cfg: Callable[[], dict] | None = None       # ours with weights: their config in timm's format
    has_batchnorm: bool = True                             # False: a lower default learning rate (lr: auto)


# Our own models by name; every other name goes to timm.
REGISTRY: dict[str, Entry] = {
    "original": Entry(SmallCNN, MIN_IMAGE_SIZE, "our small CNN, fast on a CPU"),
    "alexnet": Entry(_alexnet, 63, "torchvision AlexNet, needs ≥ 63 px", _alexnet_pretrained_cfg, has_batchnorm=False),
    "resnet9": Entry(ResNet9, MIN_IMAGE_SIZE, "Page's ResNet-9 (DAWNBench), 94 % on CIFAR-10 in 24 epochs"),
}


def build_model(name: str, num_classes: int | None, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A freshly initialised model (weights from the current torch RNG state), from timm's
    `create_model` keywords (`drop_rate`, `pretrained`, ...); None is the model's default
    (`num_classes=None`: the pretrained weights' own head).

    Ours are built from their row rather than registered with timm (`@register_model`): that
    would make every stage import timm (~2.5 s on 2 CPU cores), also for the default `original`,
    which never needs it. This and `pretrained_cfg` are the only places that tell them apart."""
    check_model_name(name)
    kwargs = {k: v for k, v in dict(kwargs, num_classes=num_classes, in_chans=in_chans).items() if v is not None}
    if name in REGISTRY:
        return REGISTRY[name].build(**kwargs)
    import timm

    return timm.create_model(name, **kwargs)


def pretrained_cfg(name: str) -> dict | None:
    """The config of `name`'s default pretrained weights, as timm's `PretrainedCfg.to_dict()`
    (url or hf_hub_id, mean, std, input_size, crop_pct, interpolation, ...); None: none known."""
    check_model_name(name)
    if name in REGISTRY:
        cfg = REGISTRY[name].pretrained_cfg
        return cfg() if cfg else None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


REAL_FORWARD_MAX_PARAMS = 30_000_000  # resnet50 (25.6 M) at 224 px: ~0.3 s on a 2-core CPU


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips the in-place initialisation (`normal_`, `uniform_`, `zero_`, `trunc_normal_`, ...)
    of meta tensors: it changes no shape, and on the meta device torch runs it through Python
    decompositions that were 3/4 of the time to build a timm model there."""

    _KEEP = {"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_",
             "swapdims_", "swapaxes_", "requires_grad_"}  # in-place too, but they change shapes or flags

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes `tensor=` by keyword
        if (name.endswith("_") and not name.endswith("__") and name not in self._KEEP
                and isinstance(target, torch.Tensor) and target.is_meta):
            return target
        return func(*args, **kwargs)


@contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules on the meta device without initialising them: no memory and ~50 ms for a
    timm model, for what needs only their structure (module types, parameter shapes)."""
    with torch.device("meta"), _SkipInitOnMeta():
        yield


@lru_cache(maxsize=None)
def _timm_has_batchnorm(name: str) -> bool:
    import timm

    with shapes_only():  # just the module types
        model = timm.create_model(name, pretrained=False)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def entry(name: str) -> Entry:
    """The registry entry of `name` (a timm name gets one with its BatchNorm found from its modules)."""
    check_model_name(name)
    return REGISTRY[name] if name in REGISTRY else Entry(has_batchnorm=_timm_has_batchnorm(name))


def head_of(model: nn.Module) -> nn.Module:
    """The final classifier layer (what transfer learning re-makes)."""
    return model.get_classifier()


def head_parameter_names(model: nn.Module) -> set[str]:
    head = {id(p) for p in head_of(model).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in head}


def reset_head(model: nn.Module) -> None:
    """Start a re-made head neutral: zero weights and bias, so every class starts at
    probability 1/K and the first loss is ln K (timm's EfficientNet init gives a 2-class head
    on 1,280 features logits of ~10 and a first loss of ~2.5, which wrecks a short fine-tune)."""
    head = head_of(model)
    nn.init.zeros_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def stage_prefixes(model: nn.Module) -> list[str]:
    """Module names of the backbone's stages, first to last (timm's `feature_info`)."""
    return [f["module"] for f in model.feature_info]


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate features (what the head sees) of normalised images."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


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
    return REGISTRY.get(name, Entry()).min_image_size


def check_model_name(name: str) -> None:
    if problem := model_name_problem(name):
        raise UserError(f"model={name!r}: {problem}")


def list_models(pattern: str = "") -> list[str]:
    """Registry names and timm names matching a glob pattern (`resnet*`)."""
    import fnmatch

    ours = [n for n in REGISTRY if not pattern or fnmatch.fnmatch(n, pattern)]
    return ours + _timm_names(pattern)


def has_pretrained_weights(name: str) -> bool:
    """Whether `pretrained: true` has weights to download for `name` (timm's hub, torchvision):
    its default pretrained config names a file (timm's `PretrainedCfg.has_weights`)."""
    cfg = pretrained_cfg(name) or {}
    return bool(cfg.get("url") or cfg.get("file") or cfg.get("hf_hub_id"))


def count_parameters(name: str, num_classes: int = 1000) -> int:
    """Parameters of `name` with a `num_classes`-class head, from its structure alone (built by
    `shapes_only`: ~50 ms for a timm model on a 2-core CPU, none of its memory)."""
    with shapes_only():
        model = build_model(name, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def size_kwargs(name: str, image_size: int) -> dict[str, int]:
    """What a model needs to be built for `image_size`: `img_size` for a timm model whose input
    size is fixed when it is built (ViT, Swin, ...: their position embeddings), else nothing."""
    cfg = pretrained_cfg(name) or {}
    return {"img_size": image_size} if cfg.get("fixed_input_size") else {}


def arch_kwargs(name: str, num_classes: int, image_size: int, dropout: float | None = None,
                drop_path: float = 0.0) -> dict[str, Any]:
    """What `name` is built with (and what a checkpoint records to build it again)."""
    kwargs = {"num_classes": num_classes, "in_chans": 3} | size_kwargs(name, image_size)
    if dropout is not None:
        kwargs["drop_rate"] = dropout
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    return kwargs


def build_problem(name: str, image_size: int, kwargs: dict[str, Any]) -> str | None:
    """Why `name` cannot be built with `kwargs` (`arch_kwargs`) or cannot take `image_size` px,
    found by running a batch through it; None when it can. Built on the meta device first (no
    memory, ~50 ms); a model of up to REAL_FORWARD_MAX_PARAMS then runs for real on the CPU
    (~0.1 s), since torch's meta versions of batch norm, pooling and matmul import its compiler
    (1.5 s of the check stage); a bigger one runs on the meta device."""
    try:
        with shapes_only():
            model = build_model(name, **kwargs)
        if sum(p.numel() for p in model.parameters()) <= REAL_FORWARD_MAX_PARAMS:
            with torch.no_grad():
                build_model(name, **kwargs).eval()(torch.zeros(2, 3, image_size, image_size))
        else:
            with shapes_only():
                model.eval()(torch.empty(2, 3, image_size, image_size))
    except TypeError as exc:  # an option the model does not take (drop_path_rate, ...)
        return f"does not take these options ({str(exc).splitlines()[0]})"
    except NotImplementedError:  # an operation without a meta implementation: found at training, if at all
        return None
    except Exception as exc:  # noqa: BLE001  (whatever the model's own code raises for this input)
        return f"cannot take {image_size} px images ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None
