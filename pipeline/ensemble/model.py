"""The ensemble as one model: a torch module holding the members, exported to ONNX as one file
that `pipeline predict` runs like any exported model.

Its input is the image normalised with member 0's mean/std (the card says so); a member trained
with another mean/std gets x·s₀/sᵢ + (m₀ − mᵢ)/sᵢ, which is (raw − mᵢ)/sᵢ. Each member's logits
are divided by its temperature; the output `logits` is log Σᵢ wᵢ softmax(zᵢ / Tᵢ), computed as
a logsumexp of log wᵢ + log_softmax(zᵢ / Tᵢ) (no log of an underflowed 0), so
softmax(output) is the ensemble's probabilities. Members of weight 0 are left out of the graph.
Multi-label members (task=multilabel): the probabilities are Σᵢ wᵢ sigmoid(zᵢ / Tᵢ) per label, the
outputs `logits` (their log-odds) and `probabilities`, and the card carries the ensemble's
thresholds, chosen on the validation split as train chooses a model's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.export.onnx import export_onnx, onnx_logits, onnx_metadata, onnx_outputs
from pipeline.probabilities import softmax

MAX_PROB_DIFF = 1e-5  # ONNX Runtime's probabilities against the reference (PyTorch members, float64 average)


class Ensemble(nn.Module):
    def __init__(self, models: list[nn.Module], temperatures: list[float], weights: list[float],
                 means: list[tuple[float, ...]], stds: list[tuple[float, ...]], multilabel: bool = False):
        super().__init__()
        self.multilabel = multilabel
        kept = [i for i, w in enumerate(weights) if w > 0]
        self.members = nn.ModuleList([models[i] for i in kept])
        self.temperatures = [float(temperatures[i]) for i in kept]
        self.renormalise = [means[i] != means[0] or stds[i] != stds[0] for i in kept]
        m0, s0 = np.array(means[0], dtype=np.float64), np.array(stds[0], dtype=np.float64)
        for j, i in enumerate(kept):
            mi, si = np.array(means[i], dtype=np.float64), np.array(stds[i], dtype=np.float64)
            self.register_buffer(f"scale{j}", _channels(s0 / si))
            self.register_buffer(f"shift{j}", _channels((m0 - mi) / si))
        self.register_buffer("log_weights", torch.tensor(np.log([weights[i] for i in kept]), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for j, member in enumerate(self.members):
            xj = x * getattr(self, f"scale{j}") + getattr(self, f"shift{j}") if self.renormalise[j] else x
            z = member(xj) / self.temperatures[j]
            if self.multilabel:
                parts.append(torch.sigmoid(z) * self.log_weights[j].exp())
            else:
                parts.append(torch.log_softmax(z, dim=1) + self.log_weights[j])
        if self.multilabel:
            p = torch.stack(parts).sum(dim=0).clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p), p
        return torch.logsumexp(torch.stack(parts), dim=0)


def _channels(values: np.ndarray) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def ensemble_card(members: list, weights: np.ndarray, thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """The model card: every key `pipeline predict` needs (member 0's preprocessing; multi-label:
    the task and the ensemble's thresholds), the members and their weights."""
    prep = members[0].prep
    about = [{"name": m.name, "source": m.source, "commit": m.commit, "arch": m.ckpt["arch"],
              "temperature": m.temperature, "weight": float(w), "mean": list(m.prep.mean), "std": list(m.prep.std)}
             for m, w in zip(members, weights)]
    if thresholds is not None:
        return {"arch": "ensemble", "classes": members[0].classes, **prep.to_dict(), "task": "multilabel",
                "thresholds": [float(t) for t in thresholds],
                "preprocessing": f"{prep.describe()}; float32 NCHW input 'images' → outputs 'probabilities' (the "
                                 "members' weighted per-label probabilities) and 'logits' (their log-odds); a label "
                                 "applies where its probability is at least its threshold",
                "members": about, "weights": [float(w) for w in weights]}
    return {"arch": "ensemble", "classes": members[0].classes, **prep.to_dict(),
            "preprocessing": f"{prep.describe()}; float32 NCHW input 'images' → output 'logits' "
                             "(log of the ensemble's probabilities)",
            "members": about, "weights": [float(w) for w in weights]}


def build(members: list, weights: np.ndarray) -> Ensemble:
    for m in members:
        m.model.to(memory_format=torch.contiguous_format)  # predict_logits leaves it channels_last
    return Ensemble([m.model for m in members], [m.temperature for m in members], list(weights),
                    [m.prep.mean for m in members], [m.prep.std for m in members],
                    members[0].ckpt.get("task") == "multilabel").eval()


def export_checked(model: Ensemble, card: dict[str, Any], path: Path, x_test: np.ndarray,
                   reference: np.ndarray) -> dict[str, float]:
    """Write the ONNX file at `path`; run it with ONNX Runtime on the normalised test images
    `x_test` and compare its probabilities with `reference`; a UserError when they disagree."""
    if model.multilabel:
        export_onnx(model, card["image_size"], path, onnx_metadata(card), ("logits", "probabilities"))
        probs = onnx_outputs(path, x_test)[1]
    else:
        export_onnx(model, card["image_size"], path, onnx_metadata(card))
        probs = softmax(onnx_logits(path, x_test))
    result = {"top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
              "max_abs_prob_diff": float(np.abs(probs - reference).max()), "n_checked": len(probs)}
    if result["top1_agreement"] < 1.0 or result["max_abs_prob_diff"] > MAX_PROB_DIFF:
        raise UserError(f"the ensemble's ONNX model disagrees with PyTorch: top-1 agreement "
                        f"{result['top1_agreement']:.4%}, max |probability diff| {result['max_abs_prob_diff']:.2e} "
                        f"(limit {MAX_PROB_DIFF:g}); a member uses an op that exports differently: report it")
    return result
