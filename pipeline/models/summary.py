"""A model summary: layer table with output shapes, parameter counts, MACs/FLOPs.

FLOPs are counted by torch's own `FlopCounterMode` on one forward pass (multiply-adds of
conv/linear/matmul; MACs = FLOPs / 2), so no extra dependency is needed."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Summary:
    name: str
    image_size: int
    num_classes: int
    rows: list[tuple[str, str, str, int]]  # module path, type, output shape, own parameters
    total_params: int
    trainable_params: int
    flops: int

    def table(self, max_depth: int = 2) -> str:
        rows = [r for r in self.rows if r[0].count(".") < max_depth]
        width = max([len(r[0]) for r in rows] + [5]) + 2
        lines = [f"{'layer':<{width}}{'type':<24}{'output shape':<22}{'params':>12}", "-" * (width + 58)]
        lines += [f"{p:<{width}}{t:<24}{s:<22}{n:>12,}" for p, t, s, n in rows]
        lines += ["-" * (width + 58),
                  f"model {self.name}: input 3×{self.image_size}×{self.image_size}, {self.num_classes} classes",
                  f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable",
                  f"compute per image: {self.flops / 2 / 1e6:,.1f} M MACs ({self.flops / 1e6:,.1f} M FLOPs)"]
        return "\n".join(lines)


def summarize(model: nn.Module, name: str, image_size: int, num_classes: int) -> Summary:
    shapes: dict[str, str] = {}
    hooks = []
    for path, module in model.named_modules():
        if path:
            hooks.append(module.register_forward_hook(
                lambda m, i, o, path=path: shapes.__setitem__(path, "×".join(map(str, o.shape[1:])) if torch.is_tensor(o) else "-")))
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    rows = [(p, type(m).__name__, shapes.get(p, "-"), sum(q.numel() for q in m.parameters(recurse=False)))
            for p, m in model.named_modules() if p]
    return Summary(name, image_size, num_classes, rows, sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in model.parameters() if p.requires_grad), counter.get_total_flops())
