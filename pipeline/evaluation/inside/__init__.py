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

The package: `layers` finds and hooks the layers and holds the figure geometry the pictures
share; `activations`, `filters` (with `maximise_channels`) and `embedding` draw one picture each.
The names below are its interface.
"""
from pipeline.evaluation.inside.activations import (
    ACT,
    CHANNELS,
    activations_figure,
    activations_png_size,
    first_of_each_class,
)
from pipeline.evaluation.inside.embedding import (
    EMB,
    EMBEDDING_PNG_SIZE,
    MIN_POINTS,
    embedding_figure,
    penultimate,
    subsample,
    tsne_2d,
)
from pipeline.evaluation.inside.embedding import _draw_embedding as _draw_embedding
from pipeline.evaluation.inside.embedding import _label_spots as _label_spots
from pipeline.evaluation.inside.filters import (
    BLUR_EVERY,
    DECAY,
    FIL,
    LR,
    MAX_FILTERS,
    STEPS,
    VIS_MAX,
    filters_figure,
    filters_png_size,
    maximise_channels,
)
from pipeline.evaluation.inside.layers import (
    PAD,
    Layer,
    capture,
    early_middle_late,
    probe,
    spatial_layers,
)
from pipeline.evaluation.inside.layers import _layout as _layout
from pipeline.plots import plt as plt

# `plt`, `_layout`, `_label_spots` and `_draw_embedding` (imported `as` themselves): for tests/test_inside.py
__all__ = ["ACT", "BLUR_EVERY", "CHANNELS", "DECAY", "EMB", "EMBEDDING_PNG_SIZE", "FIL", "LR", "MAX_FILTERS",
           "MIN_POINTS", "PAD", "STEPS", "VIS_MAX", "Layer", "activations_figure", "activations_png_size", "capture",
           "early_middle_late", "embedding_figure", "filters_figure", "filters_png_size", "first_of_each_class",
           "maximise_channels", "penultimate", "probe", "spatial_layers", "subsample", "tsne_2d"]
