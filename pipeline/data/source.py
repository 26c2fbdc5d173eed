"""What a data set hands to the prepare stage: the candidate images, their labels, how to
decode one, and (for pre-split sets) which split each belongs to.

Every data set (digits, the torchvision sets, the user's folders) builds a `Source`;
`pipeline.data.prepare` decodes each item exactly once, resizes it, and writes the splits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from pipeline.core.images import BadImage  # noqa: F401  (raised by decoders; part of the Source contract)

SPLITS = ("train", "val", "test")


@dataclass
class Source:
    classes: list[str]
    items: Sequence[Any]                       # one handle per candidate image, passed to `decode`
    labels: np.ndarray                         # int64 class index per item
    # decode(item, size_hint) → RGB PIL image or HWC uint8 RGB array, any size; raises BadImage.
    # size_hint is the final image_size: a decoder may use it to decode less (JPEG draft mode).
    decode: Callable[[Any, int], Image.Image | np.ndarray]
    splits: Sequence[str] | None = None        # per item: "train" | "val" | "test" | "" (unassigned); None: split everything
    names: Sequence[str] | None = None         # per item: a path or id for the manifest
    hashes: Sequence[str] | None = None        # per item: content hash for the manifest
    skipped: list[dict] = field(default_factory=list)  # files rejected before decoding: path, class, split, reason, hash
    notes: dict = field(default_factory=dict)  # extra facts for the data card (layout, duplicates, conflicts)

    def __post_init__(self) -> None:
        assert len(self.items) == len(self.labels), "one label per item"
        for name in ("splits", "names", "hashes"):
            seq = getattr(self, name)
            assert seq is None or len(seq) == len(self.items), f"one {name[:-1]} per item"
