"""ResNet-9: the fast CIFAR network of David Page (Myrtle.ai), "How to train your ResNet" (2018),
https://myrtle.ai/learn/how-to-train-your-resnet/, code: github.com/davidcpage/cifar10-fast (dawn.py).

What it achieves, as published (CIFAR-10, 94 % test accuracy is the DAWNBench target):
- 94 % in 79 s on one V100 (post 4, "Architecture"; fp16, 24 epochs); the repository's README:
  35 of 50 runs reached 94 %, median 94.08 %. The DAWNBench winner before it took 174 s on 8 V100s.
- 94 % in 26 s on one V100 (post 8, "Bag of tricks": 10 epochs, plus label smoothing 0.2, CELU,
  ghost BatchNorm, frozen BN scales, input whitening, EMA, flip TTA: not reproduced here).
- Its descendants (../shared/NOTES.md): airbench, 94.01 % in 2.59 s on one A100 (mean of 200 runs),
  96 % in 27 s; a standard ResNet-18 recipe reaches 96 % in about 7 minutes on an A100.

The recipe of the 79 s result (dawn.py): SGD with Nesterov momentum 0.9, weight decay 5e-4, batch
512, 24 epochs, lr linear 0 → 0.4 over 5 epochs then linear → 0 at epoch 24 (for a batch-mean
loss; dawn.py writes it as 0.4 / 512 on a summed loss), 4-px reflect-padded random crop,
left-right flip, 8×8 cutout, CIFAR mean/std normalisation, fp16; no label smoothing (post 8's).

The network (conv-BN-ReLU blocks, 3×3 convolutions without bias; "w" = 64 × `width`):
prep conv w → layer1 conv 2w + max-pool + residual(2× conv 2w) → layer2 conv 4w + max-pool →
layer3 conv 8w + max-pool + residual(2× conv 8w) → global max-pool → ×0.125 → linear.
6.57 M parameters with 10 classes (width 1), 379 M MACs per 32-px image. Any input ≥ 8 px.

Two deliberate differences from dawn.py: global max-pooling is adaptive (dawn.py's MaxPool2d(4)
is global only at 32 px), and the head has a bias (dawn.py's has none) with the ×0.125 applied
to its input rather than its output: the same function and gradients for the weights, and
`get_classifier()` returns exactly the layer that maps `forward_head(pre_logits=True)` to the
logits, which the linear probe (pipeline.training.probe) re-fits, bias included.

It offers timm's interface (`get_classifier`, `feature_info`, `forward_features`,
`forward_head`), so the pipeline treats it like any timm model."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

LOGIT_SCALE = 0.125  # Page's fixed multiplier on the logits ("weight=0.125" in dawn.py)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 convolution (no bias: BatchNorm's shift replaces it), BatchNorm, ReLU."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                     bn=nn.BatchNorm2d(c_out), relu=nn.ReLU(inplace=True)))


class Residual(nn.Module):
    """x + conv_bn(conv_bn(x)): no projection, no ReLU after the sum (as in dawn.py)."""

    def __init__(self, chans: int):
        super().__init__()
        self.res1, self.res2 = conv_bn(chans, chans), conv_bn(chans, chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


def _stage(c_in: int, c_out: int, residual: bool) -> nn.Sequential:
    parts = OrderedDict(conv=conv_bn(c_in, c_out), pool=nn.MaxPool2d(2))
    if residual:
        parts["residual"] = Residual(c_out)
    return nn.Sequential(parts)


class ResNet9(nn.Module):
    """Page's ResNet-9; `width` scales every layer's channels (1.0: 64/128/256/512; 0.25 makes a
    tiny one for tests), `drop_rate`: dropout before the head (0 in Page's recipe)."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: float = 1.0, drop_rate: float = 0.0):
        super().__init__()
        c0, c1, c2, c3 = (max(1, round(c * width)) for c in (64, 128, 256, 512))
        self.prep = conv_bn(in_chans, c0)
        self.layer1 = _stage(c0, c1, residual=True)
        self.layer2 = _stage(c1, c2, residual=False)
        self.layer3 = _stage(c2, c3, residual=True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(c3, num_classes)
        self.num_features = c3
        # timm's description of the stages (partial unfreezing trains the last ones)
        self.feature_info = [{"num_chs": c, "reduction": r, "module": m}
                             for c, r, m in ((c0, 1, "prep"), (c1, 2, "layer1"), (c2, 4, "layer2"), (c3, 8, "layer3"))]

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last spatial map, layer3's output (its residual follows the max-pool): 4×4 at 32 px."""
        return self.layer3(self.layer2(self.layer1(self.prep(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.pool(x), 1) * LOGIT_SCALE)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
