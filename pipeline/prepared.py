"""The prepared splits that prepare writes and train, evaluate and export read: uint8
N×3×S×S images (memory-mapped) and labels per split, and meta.json (classes, counts, the
training split's statistics and the completed `Preprocessing`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import read_json
from pipeline.core.preprocess import Preprocessing


def load_meta(prepared_dir: Path = paths.PREPARED_DIR) -> dict:
    path = prepared_dir / paths.PREPARED_META.name
    if not path.exists():
        raise UserError(f"{path} is missing; run the prepare stage first (dvc repro prepare)")
    try:
        return read_json(path)
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON); re-make it: dvc repro -f prepare") from None


def split_files(split: str, prepared_dir: Path = paths.PREPARED_DIR) -> tuple[Path, Path]:
    """The images and labels files of one prepared split."""
    return prepared_dir / f"{split}_x.npy", prepared_dir / f"{split}_y.npy"


def load_groups(split: str, prepared_dir: Path = paths.PREPARED_DIR) -> np.ndarray:
    """The group of each image of one prepared split (near-duplicates and data.group_by share
    a number): folds and the clean-test figures keep or check groups whole."""
    path = prepared_dir / f"{split}_group.npy"
    if not path.exists():
        raise UserError(f"{path} is missing; re-make the prepared data: dvc repro -f prepare")
    return np.load(path)


def leaked_test(prepared_dir: Path = paths.PREPARED_DIR) -> np.ndarray:
    """Per test image: True when its group has a member in train or val (a near-duplicate or
    data.group_by's group in a data set that came split)."""
    seen = np.concatenate([load_groups(s, prepared_dir) for s in ("train", "val")])
    return np.isin(load_groups("test", prepared_dir), seen)


def load_split(split: str, prepared_dir: Path = paths.PREPARED_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped uint8 images (N×3×S×S) and labels of one prepared split."""
    x_path, y_path = split_files(split, prepared_dir)
    try:
        x, y = np.load(x_path, mmap_mode="r"), np.load(y_path)
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename} is missing; run the prepare stage (dvc repro prepare)") from None
    except (ValueError, OSError, EOFError) as exc:  # truncated or overwritten: numpy's header/size checks
        raise UserError(f"{prepared_dir}/{split}_*.npy is damaged ({str(exc).splitlines()[0][:80]}); "
                        "re-make it: dvc repro -f prepare") from None
    if len(x) != len(y):
        raise UserError(f"{x_path} has {len(x)} images but {y_path} {len(y)} labels; re-make them: dvc repro -f prepare")
    return x, y


def load_preprocessing(prepared_dir: Path = paths.PREPARED_DIR) -> Preprocessing:
    return Preprocessing.from_dict(load_meta(prepared_dir)["preprocessing"])


def label_text(y: np.ndarray, classes: list[str], sep: str = ", ", none: str = "(none)") -> list[str]:
    """What each image is: its class, or (k-hot rows) its labels joined by `sep`, `none` for
    an image with no label."""
    y = np.asarray(y)
    if y.ndim == 1:
        return [classes[int(i)] for i in y]
    return [sep.join(classes[k] for k in np.flatnonzero(row)) or none for row in y]
