"""The exponential moving average of a model's weights that training keeps when
`train.ema_decay` is set (validated, kept and exported instead of the raw weights)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module, decay: float):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm statistics),
    updated after every optimizer step; None when `decay` is 0. The decay is warmed up as
    TensorFlow's ExponentialMovingAverage(num_updates) does, min(decay, (1 + n) / (10 + n))
    after n updates: with 0.999 and a few hundred steps (a small data set) a plain average
    would still be mostly the initial weights."""
    return _Ema(model, decay) if decay else None


class _Ema(nn.Module):
    """torch's `AveragedModel` layout (`module`, `n_averaged`: its state dict loads either way)
    with an update that never reads a device value: AveragedModel's `update_parameters` tests
    `n_averaged == 0` and copies it to the device every step, which on a GPU waits for the host.
    The count is kept in Python as well, read from the buffer (on the CPU) once after a load.
    Not timm's ModelEmaV3: its warmup, 1 - (1 + n/γ)^-p, cannot give TensorFlow's (1 + n)/(10 + n)
    (the averages, and so the kept weights, would change), and its state has no update count to resume from."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module, self.decay = copy.deepcopy(model), decay
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))  # stays on the CPU
        self._n: int | None = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._n = None  # read from the loaded buffer at the next update

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._n is None:
            self._n = int(self.n_averaged)
        pairs = [(a.detach(), c.detach()) for a, c in zip([*self.module.parameters(), *self.module.buffers()],
                                                          [*model.parameters(), *model.buffers()])]
        floats = [p for p in pairs if p[0].is_floating_point()]
        counts = [p for p in pairs if not p[0].is_floating_point()]  # BatchNorm's num_batches_tracked: the latest
        n = self._n
        if n == 0 or counts:
            chosen = pairs if n == 0 else counts
            torch._foreach_copy_([a for a, _ in chosen], [c for _, c in chosen])
        if n > 0 and floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats],
                                 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))
        self._n = n + 1
        self.n_averaged.fill_(self._n)
