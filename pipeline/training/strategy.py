"""How a run trains, resolved once from `finetune`, the weights and `transfer:` (`Strategy.resolve`)
and carried by the training config; the code asks it, not the `finetune` string:
- `full`: everything trains (the backbone at lr × backbone_lr_mult when weights were loaded).
- `linear_probe`: only the new head trains, on cached features of the frozen backbone, computed
  once (or `augmented_passes` times, each pass augmented): `pipeline.training.probe`.
- `partial`: the last `unfreeze_stages` stages of the backbone and the head train.
- `two_phase`: `head_epochs` epochs of head-only training, then everything trains, the backbone
  at lr × backbone_lr_mult.
Without loaded weights only `full` is allowed (params validation), and nothing is scaled or frozen.

`lr: auto` (`Strategy.auto_lr`) picks by optimizer, by whether the model has BatchNorm, and by what
trains, from the four tables below (docs/models-and-transfer.md states the AdamW column:
tests/test_docs.py holds it to them). Each is a rate the family learns at in our runs where the
next larger one does not always (AlexNet does not learn at 3× its rate); fine-tuning and the probe
on real ImageNet weights: `python benchmarks/bench_transfer.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pipeline.core.params import AugmentParams, Params

BASE = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.05, "rmsprop": 1e-3}  # from scratch, a BatchNorm CNN
NO_BATCHNORM = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.02, "rmsprop": 3e-4}  # from scratch: AlexNet, ViTs
FINE_TUNE = NO_BATCHNORM  # the head's lr on loaded weights; the backbone's is × transfer.backbone_lr_mult
PROBE = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.1, "rmsprop": 1e-3}  # a linear probe on cached, standardised features

Trains = Literal["head", "stages", "all"]  # the head only | the last unfreeze_stages stages and the head | everything


@dataclass(frozen=True)
class Strategy:
    name: str = "full"              # `finetune`: full | linear_probe | partial | two_phase
    transferred: bool = False       # weights were loaded (pretrained or a file)
    unfreeze_stages: int = 0        # partial: how many of the backbone's last stages train
    head_epochs: int = 0            # two_phase: head-only epochs before everything trains; 0 otherwise
    backbone_lr_mult: float = 1.0   # the backbone's lr ÷ the head's: transfer.backbone_lr_mult with loaded weights
    frozen_bn_stats: bool = False   # all BatchNorm statistics kept: transfer.freeze_batchnorm with loaded weights
    augmented_passes: int = 0       # linear_probe: augmented passes over the training split; 0: one plain pass
    probe_l2: float | str = "auto"  # linear_probe: the head's L2 strength; auto: picked on validation log loss

    @classmethod
    def resolve(cls, params: Params) -> Strategy:
        t, name = params.transfer, params.finetune
        transferred = bool(params.pretrained or params.weights)  # the model is built with them, or the build fails
        return cls(name, transferred, t.unfreeze_stages if name == "partial" else 0,
                   t.head_epochs if name == "two_phase" else 0, t.backbone_lr_mult if transferred else 1.0,
                   transferred and t.freeze_batchnorm, t.augmented_passes, t.probe_l2)

    def trains(self, epoch: int) -> Trains:
        """What trains in `epoch` (1-based)."""
        if self.name == "full" or (self.name == "two_phase" and epoch > self.head_epochs):
            return "all"
        return "stages" if self.name == "partial" else "head"

    @property
    def unfrozen_from(self) -> int:
        """The first epoch in which everything that will train does (two_phase: after its head epochs)."""
        return self.head_epochs + 1

    @property
    def freezes_parameters(self) -> bool:
        """Some parameters get no gradient in some epoch (DDP must not wait for them)."""
        return self.name != "full"

    @property
    def cached_features(self) -> bool:
        """The head trains on features the frozen backbone computed once, not on images."""
        return self.name == "linear_probe"

    @property
    def trains_on_augmented_images(self) -> bool:
        """False for a linear probe on features computed once from the unaugmented images."""
        return not self.cached_features or self.augmented_passes > 0

    @property
    def parallel(self) -> bool:
        """Worth launching DDP processes for: a linear probe trains on cached features in seconds."""
        return not self.cached_features

    def augment(self, augment: AugmentParams) -> AugmentParams:
        """`augment` with `resized_crop: auto` resolved: on when weights were loaded."""
        if augment.resized_crop != "auto":
            return augment
        return augment.model_copy(update={"resized_crop": self.transferred})

    def auto_lr(self, optimizer: str, has_batchnorm: bool) -> tuple[float, str]:
        """(learning rate, why) for `lr: auto`."""
        if self.cached_features:
            return PROBE[optimizer], f"{optimizer}, linear probe on cached features"
        if self.transferred:
            return FINE_TUNE[optimizer], f"{optimizer}, fine-tuning pretrained weights ({self.name}): the head's lr"
        if not has_batchnorm:
            return NO_BATCHNORM[optimizer], f"{optimizer}, from scratch, a model without BatchNorm"
        return BASE[optimizer], f"{optimizer}, from scratch, a BatchNorm model"
