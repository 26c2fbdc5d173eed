"""A model summary: layer table with output shapes, parameter counts, MACs/FLOPs.

Each row counts its module's parameters including its children's (`layer1` of resnet18:
147,968), so the rows at one depth add up to the total; parameters held directly by a module
that also has children (a ViT's `cls_token`, `pos_embed`) get a row of their own.

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
    rows: list[tuple[str, str, str, int]]  # module path, type, output shape, parameters with its children's
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
                  f"parameters: {self.total_params:,} total, {self.trainable_params:,} trainable "
                  "(a row counts its module's and its children's; the rows at one depth add up to the total)",
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
    return Summary(name, image_size, num_classes, layer_rows(model, shapes), sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in model.parameters() if p.requires_grad), counter.get_total_flops())


def layer_rows(model: nn.Module, shapes: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """(path, type, output shape, parameters with its children's) per module, in definition
    order; a module's own parameters get rows of their own where it also has children."""
    rows = []
    for path, module in model.named_modules():
        if path:
            count = sum(p.numel() for p in module.parameters())
            rows.append((path, type(module).__name__, shapes.get(path, "-"), count))
        if next(module.children(), None) is not None:
            rows += [(f"{path}.{n}" if path else n, "Parameter", "×".join(map(str, p.shape)), p.numel())
                     for n, p in module.named_parameters(recurse=False)]
    return rows
