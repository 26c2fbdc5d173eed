"""Finding and hooking the layers to show, without knowing the architecture (`probe`,
`spatial_layers`, `early_middle_late`, `capture`), and the figure geometry the three pictures share:
fixed layouts in inches, so a PNG's size follows from its counts (`_px`)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.patches import Rectangle
from torch import nn

from pipeline.plots import DPI, note_figure, plt

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

# Layouts, inches. The PNG is the figure plus savefig's padding (a frame spanning the figure
# keeps bbox_inches="tight" from cropping it).
PAD = float(plt.rcParams["savefig.pad_inches"])  # inches each side (0.1)


def _px(inches: float) -> int:
    return round((inches + 2 * PAD) * DPI)


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


# ---------------------------------------------------------------- figure geometry


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
