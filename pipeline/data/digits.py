"""scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes): real data that
works offline everywhere, the pipeline's default data set."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path
from pipeline.data.source import Source

FILE = "digits.npz"


def download(raw_dir: Path) -> Path:
    """Write the digits as uint8 images into `raw_dir`: no network."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 (ink counts); scale to the 0..255 range of an ordinary image.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    target = raw_dir / FILE
    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, images=images, labels=digits.target.astype(np.int64),
                            classes=np.array([str(c) for c in digits.target_names]))
    return target


def load_source(raw_dir: Path) -> Source:
    path = raw_dir / FILE
    if not path.exists():
        raise UserError(f"{path} is missing; run the download stage first (dvc repro download)")
    with np.load(path) as z:
        gray, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    return Source(classes, range(len(gray)), labels,
                  decode=lambda i, _size: gray[i],  # grey: prepare repeats it into RGB after resizing
                  names=[f"digits/{i}" for i in range(len(gray))])
