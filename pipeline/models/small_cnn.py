"""Our own small CNN: the default model, for learning and fast CPU runs (>0.99 test accuracy on
digits in about a minute on 2 CPU cores). It offers timm's interface (`get_classifier`,
`feature_info`, `forward_features`, `forward_head`), so the pipeline treats it like any timm model."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU ×2 + max-pool blocks (widths w, 2w, 4w), global average pooling,
    dropout (`drop_rate`, timm's name), linear head. ~0.29 M parameters at width 32; works at any
    input size ≥ 8 px."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, drop_rate: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_chans
        for out in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(chans, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                chans = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(chans, num_classes)
        self.num_features = chans
        # timm's description of the stages (partial unfreezing trains the last ones)
        self.feature_info = [dict(num_chs=w, reduction=2 ** i, module=f"features.{7 * i}")
                             for i, w in enumerate((width, 2 * width, 4 * width))]

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the last max-pool: twice the resolution for Grad-CAM."""
        return self.features[:-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.pool(self.features[-1](x)), 1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
