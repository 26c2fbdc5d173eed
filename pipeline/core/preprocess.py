"""Preprocessing: how an image becomes the model's input, as one object.

It is decided once, by whatever brings the weights:
- pretrained weights (`pretrained: true`, or a timm/torchvision state dict in `weights:`): the
  model's pretrained config: mean, std, input size, crop_pct, interpolation (as timm's
  `resolve_data_config` and torchvision's `weights.transforms()` do);
- one of our own checkpoints in `weights:`: the preprocessing recorded in it;
- training from scratch: the training split's own mean/std, filled in by prepare.

The `check` stage writes it (data/resolved/preprocessing.json), prepare completes it into
meta.json, the checkpoint, models/model.json and the ONNX metadata carry it in the one
serialisation of `to_dict`, and training, evaluation, export and predict apply it with the
methods below.

Images are stored by prepare at `stored_size` (shorter side resized to it, centre square),
a little larger than the model's input when the weights' crop_pct is below 1 (256 for 224 at
0.875): training then draws a random-resized crop per image and evaluation takes the centre
crop, as timm and torchvision evaluate ImageNet models.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are handled: prepare, download, ONNX predict never import it
    import torch

Images = TypeVar("Images", "np.ndarray", "torch.Tensor")  # every method takes either and returns the same kind

MIN_IMAGE_SIZE = 8  # pixels: the smallest model input (image_size) the pipeline makes
RESIZE_POLICIES = ("center_crop", "stretch")
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    image_size: int                      # the model's input is image_size × image_size
    stored_size: int                     # prepare keeps images at stored_size × stored_size (≥ image_size)
    resize: str = "center_crop"          # center_crop: shorter side to stored_size, centre square | stretch
    interpolation: str = "bilinear"      # resampling filter of that resize
    mean: tuple[float, ...] | None = None  # per channel in [0, 1] units; None until prepare measures the data
    std: tuple[float, ...] | None = None
    source: str = "data"                 # data | pretrained:<model> | checkpoint:<file>
    reason: str = ""                     # one line: why this preprocessing (printed by train)

    def __post_init__(self) -> None:
        assert MIN_IMAGE_SIZE <= self.image_size <= self.stored_size, (self.image_size, self.stored_size)
        assert self.resize in RESIZE_POLICIES and self.interpolation in INTERPOLATIONS

    # ------------------------------------------------------------ serialisation (the only one)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"] = list(self.mean) if self.mean is not None else None
        out["std"] = list(self.std) if self.std is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """Also reads what older checkpoints recorded (no stored_size: images kept at image_size)."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known.setdefault("stored_size", d["image_size"])
        for k in ("mean", "std"):
            if known.get(k) is not None:
                known[k] = tuple(float(v) for v in known[k])
        return cls(**known)

    def with_stats(self, mean: list[float], std: list[float]) -> "Preprocessing":
        """Fill in the data set's statistics where the weights brought none (from scratch)."""
        if self.mean is not None:
            return self
        return replace(self, mean=tuple(mean), std=tuple(std))

    # ------------------------------------------------------------ facts

    @property
    def crop_pct(self) -> float:
        return self.image_size / self.stored_size

    @property
    def complete(self) -> bool:
        return self.mean is not None and self.std is not None

    def describe(self) -> str:
        """The recipe in one line, for model cards and reports."""
        crop = f", centre crop {self.image_size}" if self.stored_size > self.image_size else ""
        return (f"RGB; resize to {self.stored_size}x{self.stored_size} ({self.resize}, {self.interpolation}){crop}; "
                f"x/255; (x - mean) / std per channel")

    # ------------------------------------------------------------ applying it

    def center_crop(self, x: Images) -> Images:
        """N×C×stored×stored → N×C×size×size (the centre); a no-op when the sizes are equal."""
        return center_crop(x, self.image_size)

    def normalize(self, x: Images) -> Images:
        assert self.complete, "preprocessing without mean/std: run prepare"
        return normalize(x, self.mean, self.std)

    def model_input(self, x: Images) -> Images:
        """Stored uint8 images → what the model sees at evaluation: centre crop, normalised
        (a tensor for PyTorch, an array for ONNX Runtime; the same float32 values bit for bit)."""
        return self.normalize(self.center_crop(x))


def center_crop(x: Images, size: int) -> Images:
    """The centre size×size of N×C×S×S images (a tensor or an array); as is when S == size."""
    if x.shape[-1] == size:
        return x
    offset = (x.shape[-1] - size) // 2
    return x[..., offset:offset + size, offset:offset + size]


def normalize(x: Images, mean, std) -> Images:
    """uint8 (0..255) or float (0..1) N×C×H×W → float32 standardised per channel. A numpy array
    takes the same float32 steps as a tensor (x / 255, then (x - mean) / std, each correctly
    rounded), so both give identical bits; torch is not imported for an array."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x
        m, s = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
        return (x - m) / s
    import torch

    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def stored_size_for(image_size: int, crop_pct: float) -> int:
    """timm's rule (`transforms_factory`): resize to floor(size / crop_pct), then crop `size`."""
    return image_size if crop_pct >= 1 else int(math.floor(image_size / crop_pct))


TTA_MODES = ("none", "hflip", "hflip_crops")


def tta_views(x: Images, image_size: int, mode: str) -> list[Images]:
    """The views test-time augmentation averages over, as N×C×size×size crops of stored images
    (a tensor or an array; the centre crop first): `none` the centre crop; `hflip` it and its
    mirror; `hflip_crops` five crops (centre and four corners, torchvision's TenCrop) and their
    mirrors. The corners lie m = max((S - size) // 2, size // 16) pixels from the centre crop,
    so images stored at the input size (S = size) get shifted crops, their edges replicated."""
    assert mode in TTA_MODES, mode
    size, c = image_size, (x.shape[-1] - image_size) // 2
    if mode == "none":
        return [center_crop(x, size)]
    if mode == "hflip":
        offsets = [(c, c)]
    else:
        m = max(c, max(1, size // 16))
        offsets = [(c, c), (c - m, c - m), (c - m, c + m), (c + m, c - m), (c + m, c + m)]
    views = [_crop_at(x, size, dy, dx) for dy, dx in offsets]
    return [v for view in views for v in (view, _hflip(view))]


def _crop_at(x: Images, size: int, dy: int, dx: int) -> Images:
    """The size×size window at (dy, dx) of N×C×S×S images; rows and columns outside the image
    repeat its edge."""
    rows, cols = (np.clip(np.arange(size) + d, 0, x.shape[-1] - 1) for d in (dy, dx))
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x[..., rows, :][..., cols])
    import torch

    r, c = torch.from_numpy(rows).to(x.device), torch.from_numpy(cols).to(x.device)
    return x.index_select(-2, r).index_select(-1, c)


def _hflip(x: Images) -> Images:
    return np.ascontiguousarray(x[..., ::-1]) if isinstance(x, np.ndarray) else x.flip(-1)
