"""The prepared splits that prepare writes and train, evaluate and export read: uint8
N×3×S×S images (memory-mapped) and labels per split, and meta.json (classes, counts, the
training split's statistics and the completed `Preprocessing`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.errors import UserError
from pipeline.io import read_json
from pipeline.preprocess import Preprocessing


def load_meta(prepared_dir: Path = paths.PREPARED_DIR) -> dict:
    path = prepared_dir / paths.PREPARED_META.name
    if not path.exists():
        raise UserError(f"{path} is missing; run the prepare stage first (dvc repro prepare)")
    return read_json(path)


def load_split(split: str, prepared_dir: Path = paths.PREPARED_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped uint8 images (N×3×S×S) and labels of one prepared split."""
    x = np.load(prepared_dir / f"{split}_x.npy", mmap_mode="r")
    y = np.load(prepared_dir / f"{split}_y.npy")
    return x, y


def load_preprocessing(prepared_dir: Path = paths.PREPARED_DIR) -> Preprocessing:
    return Preprocessing.from_dict(load_meta(prepared_dir)["preprocessing"])
