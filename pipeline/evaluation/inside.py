"""Seeing inside the model: three pictures of what the network computes, beside Grad-CAM.

- `activations_figure`: the feature maps of an early, a middle and a late layer for the first
  test image of each class (the channels of each layer varying most over those images, each
  channel scaled to its own range over the images shown, so a column compares the classes).
- `filters_figure`: the first convolution's filters as RGB pictures, and for channels of the
  middle layer the input that maximises the channel's mean activation (gradient ascent from a
  grey image with jitter, L2 decay and blur: the "feature visualisation" recipe of Olah et al.,
  Distill 2017, in its simplest form).
- `embedding_figure`: the penultimate features of the test images, PCA to ≤ 50 dimensions then
  t-SNE to 2, coloured by true class, mistakes ringed.

Layers are found without knowing the architecture: one probe forward pass of a grey image
records, in execution order, every leaf module's output that is a square spatial map (N×C×H×W,
or N×H×W×C as some ConvNeXt/Swin layers give, at least 2×2); the activation modules among them
(ReLU, GELU, ...) are preferred, and early / middle / late are the first, middle and last. A
model with fewer than two such maps (a vision transformer: only its patch embedding) gets a
note instead, as Grad-CAM does. Hooks stop the forward pass at the last layer needed.

Each figure has a fixed layout in inches, so its PNG size follows from its counts alone
(`activations_png_size`, `filters_png_size`, `EMBEDDING_PNG_SIZE`), and the same inputs give
the same bytes (seeded noise and jitter, seeded t-SNE).

Measured on this 2-core CPU (torch 2.15, quiet machine, one run each): our small CNN on digits
at 16 px (270 test images): activations 1.2 s (mostly drawing 130 small panels), filters
0.7 s, embedding 0.7 s. tf_efficientnet_lite0 with ImageNet weights: filters_figure 3.6 s at
128 px and 3.1-4.1 s at 224 px (the canvas capped at VIS_MAX = 128; a 224 px canvas took 11 s);
activations 1.3 s at 128 px, 2.0 s at 224 px; embedding of 500 CIFAR-10 images at 224 px 10.4 s
(9.2 s of it the features). Another job on the same 2 cores can make torch's two threads 10x
slower (they wait for each other), t-SNE's excepted (`tsne_2d`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import nn

from pipeline.models import pre_logits
from pipeline.plots import DPI, note_figure, plt, save
from pipeline.preprocess import Preprocessing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

CHANNELS = 4          # feature maps shown per layer and image (the layer's most varied: `_top_channels`)
STEPS = 48            # gradient-ascent steps of the feature visualisation
LR = 0.05             # Adam step, in normalised input units (the data's std)
DECAY = 0.01          # L2 decay: each step the image shrinks by this fraction towards grey
BLUR_EVERY = 4        # a Gaussian blur (σ = 0.5 px) every this many steps, not the last
VIS_MAX = 128         # px: the visualisation's canvas at most (a channel's patterns have the same size in
                      # pixels on any canvas: at 224 px they come out finer in the picture, for 3x the time)
MAX_FILTERS = 64      # first-convolution filters shown (the first ones)
MIN_POINTS = 5        # fewer test images: no embedding

# Layouts, inches. The PNG is the figure plus savefig's padding (a frame spanning the figure
# keeps bbox_inches="tight" from cropping it).
PAD = float(plt.rcParams["savefig.pad_inches"])  # inches each side (0.1)
ACT = {"left": 1.15, "top": 1.15, "bottom": 0.45, "right": 0.15, "cell": 0.62, "gap": 0.04, "group_gap": 0.3}
FIL = {"side": 0.25, "top": 0.75, "mid": 1.05, "bottom": 0.2, "cell": 0.5, "per_row": 16, "vis": 1.05, "vis_per_row": 8}
EMB = {"width": 9.5, "height": 7.45, "left": 0.25, "side": 6.4, "top": 0.6}  # plot square, legend right


def _px(inches: float) -> int:
    return round((inches + 2 * PAD) * DPI)


def activations_png_size(n_images: int, n_layers: int = 3) -> tuple[int, int]:
    """(width, height) px of activations.png: 10 classes, 3 layers → (1082, 840)."""
    w, h = _activation_inches(n_images, n_layers)
    return _px(w), _px(h)


def filters_png_size(n_filters: int, channels: int) -> tuple[int, int]:
    """(width, height) px of filters.png for a first convolution of `n_filters` and `channels`
    visualised (0: none): 32 and 8 → (910, 445); 64 and 8 → (910, 545)."""
    w, h = _filter_inches(n_filters, channels)
    return _px(w), _px(h)


EMBEDDING_PNG_SIZE = (_px(EMB["width"]), _px(EMB["height"]))  # (970, 765) px at any class count


# ---------------------------------------------------------------- finding layers


@dataclass(frozen=True)
class Layer:
    name: str         # module name (model.get_submodule)
    call: int         # which call of that module (a module may run more than once)
    shape: tuple      # C, H, W of its map
    nhwc: bool        # the output is N×H×W×C
    kind: str         # "activation", "conv" or "other"


_NOT_ACTIVATIONS = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.MultiheadAttention)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    is_act = "activation" in type(module).__module__ and not isinstance(module, _NOT_ACTIVATIONS)
    return "activation" if is_act else "other"


def _layout(t) -> str | None:
    """'NCHW' or 'NHWC' for a square spatial map of at least 2×2 (inputs are square), else None."""
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        return None
    if t.shape[2] == t.shape[3] > 1:
        return "NCHW"
    return "NHWC" if t.shape[1] == t.shape[2] > 1 else None


class _Enough(Exception):
    """Raised by a hook once every wanted map is in hand: the rest of the forward pass is skipped."""


@contextmanager
def _hooks(model: nn.Module, on: Callable, before: bool = False) -> Iterator[None]:
    """Call on(name, module, call, tensor) with each leaf module's output (its input if `before`)."""
    calls: dict[str, int] = {}

    def hook(name: str):
        def fn(module, args, output=None):
            calls[name] = calls.get(name, -1) + 1
            on(name, module, calls[name], args[0] if before else output)
        return fn

    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(hook(n)) if before else m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def probe(model: nn.Module, image_size: int) -> list[Layer]:
    """Every leaf module's square spatial output, in execution order, for one grey image."""
    found: list[Layer] = []

    def on(name, module, call, out):
        if (fmt := _layout(out)) is not None:
            shape = tuple(out.shape[1:]) if fmt == "NCHW" else (out.shape[3], *out.shape[1:3])
            found.append(Layer(name, call, shape, fmt == "NHWC", _kind(module)))

    device = next(model.parameters()).device
    with _hooks(model, on), torch.inference_mode(), _evaluating(model):
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    return found


def spatial_layers(found: list[Layer]) -> list[Layer]:
    """The maps to show: the activations' outputs, or every map when there are fewer than two."""
    acts = [layer for layer in found if layer.kind == "activation"]
    return acts if len(acts) >= 2 else found


def early_middle_late(layers: list[Layer]) -> list[Layer]:
    picked = [layers[0], layers[len(layers) // 2], layers[-1]]
    return [layer for i, layer in enumerate(picked) if layer not in picked[:i]]


def capture(model: nn.Module, x: torch.Tensor, layers: Sequence[Layer], before: bool = False) -> list[torch.Tensor]:
    """The N×C×H×W maps of `layers` for input `x` (their inputs if `before`), in the graph."""
    wanted = {(layer.name, layer.call): i for i, layer in enumerate(layers)}
    got: dict[int, torch.Tensor] = {}

    def on(name, module, call, out):
        if (i := wanted.get((name, call))) is not None:
            got[i] = out.clone()  # a later in-place op (ReLU(inplace=True), +=) must not change it
            if len(got) == len(wanted):
                raise _Enough

    with _hooks(model, on, before):
        try:
            model(x)
        except _Enough:
            pass
    assert len(got) == len(wanted), "the forward pass did not run every layer of the probe"
    return [got[i].permute(0, 3, 1, 2) if layer.nhwc else got[i] for i, layer in enumerate(layers)]


def _note(text: str, path: Path) -> str:
    note_figure(text, path)
    return text


def _frame(fig: plt.Figure) -> None:
    """An invisible rectangle over the whole figure: savefig's tight box is then the figure."""
    fig.add_artist(Rectangle((0, 0), 1, 1, transform=fig.transFigure, fill=False, edgecolor="none"))


def _axes(fig: plt.Figure, left: float, top: float, w: float, h: float) -> plt.Axes:
    """Axes at `left`, `top` (inches from the figure's top-left corner), w×h inches, no frame."""
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes((left / fw, 1 - (top + h) / fh, w / fw, h / fh))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[:].set_visible(False)
    return ax


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


# ---------------------------------------------------------------- activations


def _activation_inches(n_images: int, n_layers: int) -> tuple[float, float]:
    a = ACT
    group = CHANNELS * a["cell"] + (CHANNELS - 1) * a["gap"]
    width = a["left"] + a["cell"] + n_layers * (a["group_gap"] + group) + a["right"]
    return width, a["top"] + n_images * (a["cell"] + a["gap"]) + a["bottom"]


def first_of_each_class(y: np.ndarray, max_classes: int) -> np.ndarray:
    """The index of the first image of each class present, classes in order, at most max_classes."""
    labels, first = np.unique(np.asarray(y), return_index=True)
    return first[np.argsort(labels)][:max_classes]


def activations_figure(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: Sequence[str],
                       prep: Preprocessing, path: Path, max_classes: int = 10) -> str | None:
    """Draw into `path` the input crop and CHANNELS feature maps (`_top_channels`) of an early, a
    middle and a late layer for the first image of each class (at most `max_classes`; stored
    uint8 N×3×S×S `x`). A model with no spatial maps gets a note, also returned; else None."""
    layers = spatial_layers(probe(model, prep.image_size))
    if len(layers) < 2:
        return _note(f"Activations skipped: {type(model).__name__} has no spatial feature maps past its input "
                     "(e.g. a vision transformer)", path)
    picked = early_middle_late(layers)
    idx = first_of_each_class(y, max_classes)
    crops = np.array(prep.center_crop(np.asarray(x[idx])))
    device = next(model.parameters()).device
    with torch.inference_mode(), _evaluating(model):
        maps = capture(model, prep.normalize(torch.from_numpy(crops).to(device)), picked)
    maps = [m.float().cpu().numpy() for m in maps]
    _draw_activations(crops, [classes[int(c)] for c in np.asarray(y)[idx]], picked, maps, path)
    return None


def _top_channels(fmap: np.ndarray) -> np.ndarray:
    """The CHANNELS channels that vary most over the images and positions shown (the most active
    on average are often saturated everywhere: flat pictures, e.g. ReLU6 at 6 in EfficientNet)."""
    return np.argsort(-fmap.std(axis=(0, 2, 3)), kind="stable")[:CHANNELS]


def _draw_activations(crops: np.ndarray, names: list[str], layers: list[Layer], maps: list[np.ndarray],
                      path: Path) -> None:
    a, n = ACT, len(crops)
    fig = plt.figure(figsize=_activation_inches(n, len(layers)))
    _frame(fig)
    row = a["cell"] + a["gap"]
    for i, (crop, name) in enumerate(zip(crops, names)):
        ax = _axes(fig, a["left"], a["top"] + i * row, a["cell"], a["cell"])
        ax.imshow(crop.transpose(1, 2, 0), interpolation="nearest")
        ax.set_ylabel(_short(name, 14), rotation=0, ha="right", va="center", fontsize=8)
        if i == 0:
            ax.set_title("input", fontsize=8)
    x0 = a["left"] + a["cell"]
    for role, layer, fmap in zip(("early", "middle", "late"), layers, maps):
        x0 += a["group_gap"]
        _draw_layer(fig, x0, f"{role}: {_short(layer.name, 24)}", layer, fmap, n)
        x0 += CHANNELS * a["cell"] + (CHANNELS - 1) * a["gap"]
    fig.suptitle("Inside the model: feature maps of three layers, the first test image of each class",
                 y=1 - 0.2 / fig.get_size_inches()[1], fontsize=10, va="top")
    fig.text(0.5, 0.2 / fig.get_size_inches()[1], "Each column: one channel (of the layer's channels, those varying "
             "most over these images), scaled to its range over the column; bright = strong activation.",
             ha="center", va="center", fontsize=8, color="dimgrey")
    save(fig, path)


def _draw_layer(fig: plt.Figure, x0: float, header: str, layer: Layer, fmap: np.ndarray, n: int) -> None:
    a = ACT
    c, h, w = layer.shape
    fig.text((x0 + (CHANNELS * (a["cell"] + a["gap"])) / 2) / fig.get_size_inches()[0],
             1 - (a["top"] - 0.3) / fig.get_size_inches()[1], f"{header}\n{c} channels, {h}×{w}",
             ha="center", va="bottom", fontsize=8)
    for j, ch in enumerate(_top_channels(fmap)):
        column = fmap[:, ch]
        lo, hi = float(column.min()), float(column.max())
        for i in range(n):
            step = a["cell"] + a["gap"]
            ax = _axes(fig, x0 + j * step, a["top"] + i * step, a["cell"], a["cell"])
            ax.imshow(column[i], cmap="inferno", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if i == 0:
                ax.set_title(f"ch {ch}", fontsize=7)


# ---------------------------------------------------------------- filters and feature visualisation


def _filter_inches(n_filters: int, channels: int) -> tuple[float, float]:
    f = FIL
    cols = max(1, min(n_filters, f["per_row"]))
    rows = -(-min(n_filters, MAX_FILTERS) // f["per_row"])
    vis_cols, vis_rows = min(channels, f["vis_per_row"]), -(-channels // f["vis_per_row"])
    width = 2 * f["side"] + max(cols * f["cell"], vis_cols * f["vis"])
    height = f["top"] + rows * f["cell"] + f["mid"] + vis_rows * (f["vis"] + 0.2) + f["bottom"]
    return width, height


def filters_figure(model: nn.Module, prep: Preprocessing, path: Path, channels: int = 8, steps: int = STEPS,
                   seed: int = 0) -> str | None:
    """Draw into `path` the first convolution's filters (each scaled to [0, 1]) and, for
    `channels` channels of the middle spatial layer (evenly spaced), the input that maximises
    the channel's mean activation (`maximise_channels`). The model is left as it was. Returns
    None, or a note of what could not be drawn: everything (no convolution: a note figure), or
    the visualisation (no spatial layer past the first convolution: its filters alone)."""
    found = probe(model, prep.image_size)
    first = next((layer for layer in found if layer.kind == "conv"), None)
    if first is None:
        return _note(f"Filters skipped: {type(model).__name__} has no convolution", path)
    weight = model.get_submodule(first.name).weight.detach().float().cpu().numpy()
    layers = spatial_layers(found)
    target = early_middle_late(layers)[1] if len(layers) >= 2 else None
    if target is None:
        _draw_filters(first, weight, None, None, 0, steps, path)
        return (f"Feature visualisation skipped: {type(model).__name__} has no spatial layer past its first "
                f"convolution {first.name} (e.g. a vision transformer); its filters are drawn")
    chosen = np.unique(np.linspace(0, target.shape[0] - 1, channels).round().astype(int))
    vis = (chosen, maximise_channels(model, target, chosen, prep, steps, seed))
    _draw_filters(first, weight, target, vis, channels, steps, path)
    return None


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter requiring a gradient; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with _evaluating(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _blur(img: torch.Tensor) -> torch.Tensor:
    """Gaussian blur, σ = 0.5 px (3×3 kernel), each channel on its own, edges replicated."""
    k1 = torch.tensor([0.1065, 0.7870, 0.1065], dtype=img.dtype, device=img.device)
    kernel = (k1[:, None] * k1[None, :]).expand(img.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=img.shape[1])


def maximise_channels(model: nn.Module, layer: Layer, chosen: np.ndarray, prep: Preprocessing, steps: int = STEPS,
                      seed: int = 0) -> np.ndarray:
    """For each channel in `chosen` of `layer`, the input (uint8 3×S×S; S the model's input
    size, at most VIS_MAX) that maximises its mean activation, taken before the layer's
    non-linearity (a channel that starts dead still has a gradient). Adam from grey plus faint
    seeded noise, all channels in one batch; each step a random shift of up to S/16 px, L2
    decay towards grey, every BLUR_EVERY steps a slight blur; clamped to real pixel values."""
    size, n = min(prep.image_size, VIS_MAX), len(chosen)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    img = (0.01 * torch.randn(n, 3, size, size, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([img], lr=LR)
    reach, rows = max(1, size // 16), torch.arange(n)
    with _frozen(model):
        for step in range(steps):
            dy, dx = torch.randint(-reach, reach + 1, (2,), generator=gen).tolist()
            shifted = torch.roll(img, (dy, dx), (2, 3)).to(device)
            (fmap,) = capture(model, shifted, [layer], before=layer.kind == "activation")
            loss = -fmap[rows, torch.as_tensor(chosen)].float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                img.mul_(1 - DECAY)
                if step % BLUR_EVERY == BLUR_EVERY - 1 and step < steps - 1:
                    img.copy_(_blur(img))
                img.copy_(torch.maximum(torch.minimum(img, hi), lo))
    pixels = (img.detach() * std + mean).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).numpy()


def _stretch(img: np.ndarray) -> np.ndarray:
    """uint8 3×H×W → H×W×3 floats, contrast stretched to its 1st–99th percentiles (display only)."""
    lo, hi = np.percentile(img, (1, 99))
    return np.clip((img.transpose(1, 2, 0).astype(np.float32) - lo) / max(hi - lo, 1.0), 0, 1)


def _filter_rgb(w: np.ndarray) -> np.ndarray:
    """One filter (C×k×k) → k×k×3 in [0, 1], scaled by its own min and max (grey when C ≠ 3)."""
    w = w if w.shape[0] == 3 else np.repeat(w.mean(0, keepdims=True), 3, axis=0)
    span = w.max() - w.min()
    return ((w - w.min()) / span if span > 0 else np.full_like(w, 0.5)).transpose(1, 2, 0)


def _draw_filters(first: Layer, weight: np.ndarray, target: Layer | None, vis, channels: int, steps: int,
                  path: Path) -> None:
    """The filter grid on top; below it the visualisations `vis` (chosen channels, images) of
    `target`, or a line saying there is none."""
    f = FIL
    fig = plt.figure(figsize=_filter_inches(len(weight), channels))
    _frame(fig)
    fh = fig.get_size_inches()[1]
    rows = _draw_filter_grid(fig, first, weight)
    top = f["top"] + rows * f["cell"] + f["mid"]
    if vis is None:
        fig.text(0.5, 1 - (top - 0.4) / fh, "No spatial layer past the first convolution to visualise "
                 "(e.g. a vision transformer).", ha="center", va="bottom", fontsize=9)
    else:
        chosen, images = vis
        fig.text(0.5, 1 - (top - 0.45) / fh, f"What excites a channel of the middle layer "
                 f"{_short(target.name, 30)} ({target.shape[0]} channels): the input maximising its mean\n"
                 f"activation, by {steps} steps of gradient ascent from grey on a {images.shape[-1]} px canvas "
                 "(jitter, L2 decay, blur)", ha="center", va="bottom", fontsize=9)
        per_row, step = f["vis_per_row"], f["vis"]
        for j, (ch, img) in enumerate(zip(chosen, images)):
            left, below = f["side"] + (j % per_row) * step, top + (j // per_row) * (step + 0.2)
            ax = _axes(fig, left, below, step - 0.08, step - 0.08)
            ax.imshow(_stretch(img), interpolation="nearest" if img.shape[-1] < 64 else "antialiased")
            ax.set_title(f"channel {ch}", fontsize=7)
    save(fig, path)


def _draw_filter_grid(fig: plt.Figure, first: Layer, weight: np.ndarray) -> int:
    """The title and up to MAX_FILTERS filters, FIL["per_row"] a row; returns the rows drawn."""
    f, n = FIL, len(weight)
    shown = min(n, MAX_FILTERS)
    what = f"all {n}" if shown == n else f"the first {shown} of {n}"
    k = "×".join(map(str, weight.shape[2:]))
    fig.text(0.5, 1 - 0.2 / fig.get_size_inches()[1], f"First convolution ({_short(first.name, 30)}): {what} "
             f"filters, {k}, {weight.shape[1]} input channels\neach scaled to [0, 1] on its own (grey = 0.5)",
             ha="center", va="top", fontsize=9)
    for i in range(shown):
        ax = _axes(fig, f["side"] + (i % f["per_row"]) * f["cell"], f["top"] + (i // f["per_row"]) * f["cell"],
                   f["cell"] - 0.04, f["cell"] - 0.04)
        ax.imshow(_filter_rgb(weight[i]), interpolation="nearest")
    return -(-shown // f["per_row"])


# ---------------------------------------------------------------- embedding


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """All indices when n ≤ max_points, else a seeded sample of max_points (sorted)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def penultimate(model: nn.Module, x: np.ndarray, prep: Preprocessing, batch_size: int = 64) -> np.ndarray:
    """Penultimate features (N×D float32, what the head sees) of stored uint8 N×3×S×S images,
    under the evaluation preprocessing, channels_last batches of 64 as `predict_logits`."""
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.array(x[start:start + batch_size])).to(device)
            xb = prep.model_input(xb).contiguous(memory_format=torch.channels_last)
            out.append(pre_logits(model, xb).flatten(1).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def tsne_2d(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """PCA to min(50, D, n) dimensions, then t-SNE (init PCA, perplexity min(30, (n-1)/3)):
    the n×2 points and a line naming the method. On one thread: the same points on any machine
    (no reduction whose order depends on the thread count), and on a shared 2-core CPU far
    faster (500 points: 1.5 s on one thread, 34 s on two contending with another job)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n, d = features.shape
    k = min(50, d, n)
    perplexity = min(30.0, (n - 1) / 3)
    with threadpool_limits(1):
        reduced = PCA(n_components=k, svd_solver="full", random_state=seed).fit_transform(features.astype(np.float64))
        points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    return points, f"t-SNE (perplexity {perplexity:.3g}) of the penultimate features ({d} dims, PCA to {k})"


def embedding_figure(model: nn.Module, x: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     prep: Preprocessing, path: Path, seed: int = 0, max_points: int = 2000) -> str | None:
    """Draw into `path` the test images' penultimate features in 2-D (`tsne_2d`), coloured by
    true class, the model's mistakes (argmax of `probs` ≠ y) ringed in black; at most `max_points`
    images (a seeded sample). Fewer than MIN_POINTS images: a note, also returned; else None."""
    if len(y) < MIN_POINTS:
        return _note(f"Embedding skipped: {len(y)} test images, fewer than {MIN_POINTS}", path)
    idx = subsample(len(y), max_points, seed)
    y_s = np.asarray(y)[idx]
    wrong = np.asarray(probs)[idx].argmax(1) != y_s
    points, method = tsne_2d(penultimate(model, x[idx] if len(idx) < len(y) else x, prep), seed)
    sample = "all" if len(idx) == len(y) else f"a seeded sample of {len(idx):,} of {len(y):,}"
    title = f"{method}\n{len(idx):,} test images ({sample}), {int(wrong.sum()):,} misclassified (ringed)"
    _draw_embedding(points, y_s, wrong, list(classes), title, path)
    return None


def _colours(k: int) -> list:
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def _draw_embedding(points: np.ndarray, y: np.ndarray, wrong: np.ndarray, classes: list[str], title: str,
                    path: Path) -> None:
    e = EMB
    fig = plt.figure(figsize=(e["width"], e["height"]))
    _frame(fig)
    ax = _axes(fig, e["left"], e["top"], e["side"], e["side"])
    ax.spines[:].set_visible(True)
    colours, size = _colours(len(classes)), 14 if len(y) <= 600 else 7
    for c in range(len(classes)):
        at = y == c
        ax.scatter(points[at, 0], points[at, 1], s=size, color=colours[c], linewidths=0, alpha=0.85)
    ax.scatter(points[wrong, 0], points[wrong, 1], s=size * 3.5, facecolors="none", edgecolors="black",
               linewidths=0.8)  # a ring: the true class's colour still shows inside
    _label_classes(fig, ax, points, y, classes, colours, int(wrong.sum()))
    ax.set_title(title, fontsize=9)
    fig.text(0.5, 0.25 / e["height"], "Near points: images the model sees alike (t-SNE keeps neighbours; "
             "distances between clusters and cluster sizes mean little).", ha="center", fontsize=8, color="dimgrey")
    save(fig, path)


def _label_classes(fig, ax, points, y, classes, colours, n_wrong: int) -> None:
    """A legend (≤ 20 classes) right of the plot; more classes: names at their points' medians
    where they do not overlap (`_label_spots`)."""
    e = EMB
    handles = [Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=7, label=f"misclassified ({n_wrong:,})")]
    if len(classes) <= 20:
        handles = [Line2D([], [], ls="", marker="o", color=colours[c], label=_short(name, 22))
                   for c, name in enumerate(classes)] + handles
    else:
        for c, (mx, my) in _label_spots(ax, points, y):
            ax.text(mx, my, _short(classes[c], 12), fontsize=6, ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": colours[c], "alpha": 0.8, "lw": 0.8})
    x0 = (e["left"] + e["side"] + 0.2) / e["width"]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(x0, 1 - e["top"] / e["height"]), fontsize=8,
               frameon=False, title="true class" if len(handles) > 1 else None, title_fontsize=8, alignment="left")


def _label_spots(ax, points: np.ndarray, y: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, its points' median) for names that fit: the tightest classes first, each kept
    only if its label (0.9 × 0.16 in) overlaps none already placed."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    box = np.array([0.9 * (x1 - x0), 0.16 * (y1 - y0)]) / EMB["side"]
    spots = []
    for c in np.unique(y):
        at = points[y == c]
        median = np.median(at, axis=0)
        spots.append((float(np.median(np.abs(at - median).sum(1) / box.sum())), int(c), median))
    placed: list[tuple[int, np.ndarray]] = []
    for _, c, median in sorted(spots, key=lambda s: (s[0], s[1])):
        if all((np.abs(median - other) >= box).any() for _, other in placed):
            placed.append((c, median))
    return placed
