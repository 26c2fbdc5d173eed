"""Data sets → prepared splits.

`download` materialises a data set under data/raw/; `load_source` turns it into a `Source`
(candidate images + labels); `prepare` decodes every image exactly once, resizes it to
`image_size`, assigns seeded stratified train/val/test splits (keeping a set's own splits
where it has them), computes per-channel mean/std on the train split only, and writes
compact uint8 N×3×S×S `.npy` arrays that training memory-maps, plus a manifest of every
file considered and the data report.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from PIL import Image, ImageOps
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from pipeline import paths
from pipeline.errors import UserError
from pipeline.io import atomic_dir, atomic_path, read_json, write_json
from pipeline.source import SPLITS, BadImage, Source

RESIZE_POLICIES = ("center_crop", "stretch")
_CHUNK = 4096  # images per chunk when copying or reducing memory-mapped arrays


# ---------------------------------------------------------------- download


def download(dataset: str, raw_dir: Path = paths.RAW_DIR, data_dir: Path | None = None) -> Path:
    """Materialise `dataset` under `raw_dir`; return what was written. Idempotent.
    For `folder` nothing is downloaded: the user's `data_dir` is checked to exist."""
    if dataset == "digits":
        return _download_digits(raw_dir)
    if dataset == "folder":
        if data_dir is None or not data_dir.is_dir():
            raise UserError(f"data_dir={str(data_dir)!r} is not a folder; point data_dir at a folder of class "
                            "folders (root/<class>/*.jpg or root/train|val|test/<class>/*.jpg)")
        # Nothing to fetch; record where the images are (prepare depends on data_dir itself).
        target = raw_dir / "folder.json"
        write_json(target, {"dataset": "folder", "data_dir": str(data_dir.resolve())})
        return target
    from pipeline import tvsets

    raw_dir.mkdir(parents=True, exist_ok=True)
    return tvsets.download(dataset, raw_dir)


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


def load_source(dataset: str, raw_dir: Path = paths.RAW_DIR, data_dir: Path | None = None) -> Source:
    if dataset == "folder":
        from pipeline.folder import scan_folder

        return scan_folder(Path(data_dir or "."))
    if dataset != "digits":
        from pipeline import tvsets

        return tvsets.load_source(dataset, raw_dir)
    path = raw_dir / "digits.npz"
    if not path.exists():
        raise UserError(f"{path} is missing; run the download stage first (dvc repro download)")
    with np.load(path) as z:
        gray, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    return Source(classes, range(len(gray)), labels,
                  decode=lambda i, _size: np.repeat(gray[i][:, :, None], 3, axis=2),
                  names=[f"digits/{i}" for i in range(len(gray))])


# ---------------------------------------------------------------- prepare


def resize(image: Image.Image | np.ndarray, size: int, policy: str = "center_crop") -> np.ndarray:
    """RGB image of any size → size×size×3 uint8. `center_crop`: scale the shorter side to
    `size`, crop the centre; `stretch`: scale each side to `size` (aspect ratio not kept).
    Bilinear, antialiased when shrinking (Pillow's resize filters scale their support)."""
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (size, size):
            return image
        image = Image.fromarray(image)
    if image.size != (size, size):
        if policy == "stretch":
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        else:
            image = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                  need: tuple[str, ...] = ("val", "test")) -> dict[str, np.ndarray]:
    """Seeded, stratified split of positions 0..len(labels)-1 into train and the `need`ed
    splits. Both carved: test_fraction and val_fraction of the whole; one carved: its
    fraction of the whole."""
    idx = np.arange(len(labels))
    out: dict[str, np.ndarray] = {}
    try:
        rest = idx
        if "test" in need:
            rest, out["test"] = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        if "val" in need:
            frac = val_fraction / (1.0 - test_fraction) if "test" in need else val_fraction
            rest, out["val"] = train_test_split(rest, test_size=frac, stratify=labels[rest], random_state=seed)
    except ValueError as exc:  # too few images per class for the requested fractions
        raise UserError(f"cannot split the data set: {exc}; add images or change data.val_fraction/test_fraction") from None
    out["train"] = rest
    return {k: np.sort(v) for k, v in out.items()}


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a uint8 N×C×H×W array, read in chunks so a
    memory-mapped array is never loaded whole (float64 sums: exact enough for any size)."""
    c = x.shape[1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(x), _CHUNK):
        chunk = np.asarray(x[start:start + _CHUNK], dtype=np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
        total += chunk.sum(axis=1)
        total_sq += np.einsum("ij,ij->i", chunk, chunk)
        count += chunk.shape[1]
    mean = total / count / 255.0
    std = np.sqrt(np.maximum(total_sq / count / 255.0**2 - mean**2, 1e-12))
    return [float(m) for m in mean], [float(s) for s in std]


_DECODE_CHUNK = 256   # images per task handed to a decode worker
_PARALLEL_FROM = 4096  # fewer images than this: decode in-process (a pool costs more than it saves)
_WORK: tuple | None = None  # (source, image_size, policy, out path) for forked decode workers


def _decode_range(bounds: tuple[int, int]) -> list[str]:
    """Decode items start..stop-1 into the memory-mapped output; a skip reason per item ('' = used)."""
    source, image_size, policy, out_path = _WORK
    out = np.load(out_path, mmap_mode="r+")
    reasons = []
    for i in range(*bounds):
        try:
            out[i] = resize(source.decode(source.items[i], image_size), image_size, policy).transpose(2, 0, 1)
            reasons.append("")
        except BadImage as exc:
            reasons.append(str(exc))
    out.flush()
    return reasons


def decode_workers(n_items: int) -> int:
    """Processes for decoding: every core this process may use (at most 8) for a large set."""
    return 1 if n_items < _PARALLEL_FROM else max(1, min(8, len(os.sched_getaffinity(0))))


def _decode_all(source: Source, image_size: int, policy: str, out_path: Path, progress: bool) -> list[str]:
    """Decode + resize every item into the N×3×S×S array at `out_path`; a skip reason per item.
    Large sets are decoded by forked worker processes, each writing its own slices of the
    shared memory-mapped file (decoding is CPU-bound Python + libjpeg: threads would not scale)."""
    global _WORK
    n = len(source.items)
    chunks = [(start, min(start + _DECODE_CHUNK, n)) for start in range(0, n, _DECODE_CHUNK)]
    workers = decode_workers(n)
    bar = tqdm(total=n, desc=f"prepare: decoding ({workers} process{'es' if workers > 1 else ''})", unit="img",
               disable=not progress, mininterval=1.0, leave=False)
    _WORK = (source, image_size, policy, out_path)
    try:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = []
                for part in pool.imap(_decode_range, chunks):  # in order: results line up with items
                    results.append(part)
                    bar.update(len(part))
        else:
            results = []
            for bounds in chunks:
                results.append(_decode_range(bounds))
                bar.update(len(results[-1]))
    finally:
        _WORK = None
        bar.close()
    return [reason for part in results for reason in part]


def _assign_splits(source: Source, used: np.ndarray, val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, np.ndarray]:
    """Item indices per split: a set's own splits where given, missing ones carved out of train."""
    given = np.array(source.splits, dtype=object)[used] if source.splits is not None else np.full(len(used), "")
    present = {s for s in SPLITS if (given == s).any()}
    pool = np.flatnonzero((given == "train") | (given == ""))
    need = tuple(s for s in ("val", "test") if s not in present)
    carved = split_indices(source.labels[used][pool], val_fraction, test_fraction, seed, need)
    out = {s: used[pool[carved[s]]] if s in carved else used[np.flatnonzero(given == s)] for s in SPLITS}
    return {s: np.sort(v) for s, v in out.items()}


def prepare(source: Source, image_size: int, val_fraction: float, test_fraction: float, seed: int,
            out_dir: Path = paths.PREPARED_DIR, resize_policy: str = "center_crop",
            progress: bool = False) -> dict:
    """Write `{split}_x.npy` (uint8 N×3×S×S), `{split}_y.npy` (int64), `manifest.csv` and
    `meta.json` into `out_dir` (atomically: all or nothing); return the meta dict."""
    classes = source.classes
    if len(classes) < 2:
        raise UserError(f"the data set has {len(classes)} class(es) ({', '.join(classes) or 'none'}); at least 2 are needed")
    with atomic_dir(out_dir) as tmp:
        all_x = open_memmap(tmp / "_decoded.npy", mode="w+", dtype=np.uint8,
                            shape=(len(source.items), 3, image_size, image_size))
        all_x.flush()  # the header and size on disk, before the workers map the file
        reasons = _decode_all(source, image_size, resize_policy, tmp / "_decoded.npy", progress)
        used = np.array([i for i, r in enumerate(reasons) if not r], dtype=np.int64)
        counts = np.bincount(source.labels[used], minlength=len(classes))
        if empty := [classes[k] for k in np.flatnonzero(counts == 0)]:
            raise UserError(f"class {', '.join(map(repr, empty))} has no usable image; add images or remove the class folder")
        splits = _assign_splits(source, used, val_fraction, test_fraction, seed)
        if empty := [s for s in SPLITS if len(splits[s]) == 0]:
            raise UserError(f"the {'/'.join(empty)} split would be empty; add images or change data.val_fraction/test_fraction")
        for name, idx in splits.items():
            x = open_memmap(tmp / f"{name}_x.npy", mode="w+", dtype=np.uint8, shape=(len(idx), 3, image_size, image_size))
            for start in range(0, len(idx), _CHUNK):
                x[start:start + _CHUNK] = all_x[idx[start:start + _CHUNK]]
            x.flush()
            np.save(tmp / f"{name}_y.npy", source.labels[idx].astype(np.int64))
        del all_x
        (tmp / "_decoded.npy").unlink()
        mean, std = channel_stats(np.load(tmp / "train_x.npy", mmap_mode="r"))
        manifest = _manifest(source, reasons, splits)
        manifest.to_csv(tmp / paths.MANIFEST.name, index=False)
        meta = {"classes": classes, "image_size": image_size, "resize": resize_policy, "mean": mean, "std": std,
                "counts": {s: int(len(splits[s])) for s in SPLITS}}
        write_json(tmp / paths.PREPARED_META.name, meta)
    return meta


def _manifest(source: Source, reasons: list[str], splits: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per file considered: path, class, split, status (used/skipped), reason, hash."""
    split_of = np.full(len(source.items), "", dtype=object)
    for name, idx in splits.items():
        split_of[idx] = name
    given = source.splits if source.splits is not None else [""] * len(source.items)
    rows = pd.DataFrame({
        "path": list(source.names) if source.names is not None else [str(i) for i in source.items],
        "class": [source.classes[k] for k in source.labels],
        "split": [s or g for s, g in zip(split_of, given)],
        "status": ["skipped" if r else "used" for r in reasons],
        "reason": reasons,
        "hash": list(source.hashes) if source.hashes is not None else "",
    })
    if source.skipped:
        rows = pd.concat([rows, pd.DataFrame(source.skipped).assign(status="skipped")], ignore_index=True)
    return rows.fillna("")


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
