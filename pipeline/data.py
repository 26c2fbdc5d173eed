"""Data sets: materialise raw data (download stage) and turn it into prepared splits
(prepare stage): seeded stratified split, resize to `image_size`, compact uint8 NCHW arrays,
per-channel mean/std from the train split only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from pipeline import paths
from pipeline.errors import UserError
from pipeline.io import atomic_dir, atomic_path, read_json, write_json

SPLITS = ("train", "val", "test")


@dataclass
class RawDataset:
    """Images as a list of HWC uint8 RGB arrays (any size), integer labels, class names."""

    images: list[np.ndarray]
    labels: np.ndarray
    classes: list[str]


# ---------------------------------------------------------------- download


def download(dataset: str, raw_dir: Path = paths.RAW_DIR) -> Path:
    """Materialise `dataset` under `raw_dir`; return the file written. Idempotent."""
    if dataset == "digits":
        return _download_digits(raw_dir)
    raise UserError(f"dataset={dataset!r}: no downloader")  # params validation stops this earlier


def _download_digits(raw_dir: Path) -> Path:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes): no network."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 (ink counts); scale to the 0..255 range of an ordinary image.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    target = raw_dir / "digits.npz"
    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, images=images, labels=digits.target.astype(np.int64),
                            classes=np.array([str(c) for c in digits.target_names]))
    return target


def load_raw(dataset: str, raw_dir: Path = paths.RAW_DIR) -> RawDataset:
    if dataset == "digits":
        path = raw_dir / "digits.npz"
        if not path.exists():
            raise UserError(f"{path} is missing; run the download stage first (dvc repro download)")
        with np.load(path) as z:
            gray = z["images"]
            return RawDataset([np.repeat(g[:, :, None], 3, axis=2) for g in gray],
                              z["labels"], [str(c) for c in z["classes"]])
    raise UserError(f"dataset={dataset!r}: no loader")


# ---------------------------------------------------------------- prepare


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """HWC uint8 → size×size×3 uint8 (bilinear; antialiased when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices."""
    idx = np.arange(len(labels))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        val_of_rest = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=val_of_rest, stratify=labels[rest], random_state=seed)
    except ValueError as exc:  # too few images per class for the requested fractions
        raise UserError(f"cannot split the data set: {exc}; add images or change data.val_fraction/test_fraction") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a uint8 NCHW array (float64 accumulation)."""
    n, c = x.shape[0], x.shape[1]
    flat = x.transpose(1, 0, 2, 3).reshape(c, -1)
    mean = flat.mean(axis=1, dtype=np.float64) / 255.0
    sq = np.einsum("ij,ij->i", flat.astype(np.float64), flat.astype(np.float64)) / flat.shape[1] / 255.0**2
    std = np.sqrt(np.maximum(sq - mean**2, 1e-12))
    return [float(m) for m in mean], [float(s) for s in std]


def prepare(raw: RawDataset, image_size: int, val_fraction: float, test_fraction: float,
            seed: int, out_dir: Path = paths.PREPARED_DIR) -> dict:
    """Write `{split}_x.npy` (uint8 N×3×S×S), `{split}_y.npy` (int64) and `meta.json`;
    return the meta dict (classes, mean, std, image_size, counts)."""
    if len(raw.classes) < 2:
        raise UserError(f"the data set has {len(raw.classes)} class(es); at least 2 are needed")
    splits = split_indices(raw.labels, val_fraction, test_fraction, seed)
    arrays = {}
    for name, idx in splits.items():
        x = np.stack([resize(raw.images[i], image_size) for i in idx]).transpose(0, 3, 1, 2)
        arrays[name] = (np.ascontiguousarray(x), raw.labels[idx].astype(np.int64))
    mean, std = channel_stats(arrays["train"][0])
    meta = {
        "classes": raw.classes,
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "counts": {name: int(len(arrays[name][1])) for name in SPLITS},
    }
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in arrays.items():
            np.save(tmp / f"{name}_x.npy", x)
            np.save(tmp / f"{name}_y.npy", y)
        write_json(tmp / paths.PREPARED_META.name, meta)
    return meta


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
