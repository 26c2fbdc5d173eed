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
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from pipeline import paths
from pipeline.data.source import SPLITS, Source
from pipeline.errors import UserError
from pipeline.images import BadImage, resize
from pipeline.io import atomic_dir, write_json
from pipeline.preprocess import Preprocessing

_CHUNK = 4096  # images per chunk when copying or reducing memory-mapped arrays


# ---------------------------------------------------------------- prepare


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
_WORK: tuple | None = None  # (source, preprocessing, out path) for forked decode workers


def _decode_range(bounds: tuple[int, int]) -> list[str]:
    """Decode items start..stop-1 into the memory-mapped output; a skip reason per item ('' = used)."""
    source, prep, out_path = _WORK
    size = prep.stored_size
    out = np.load(out_path, mmap_mode="r+")
    reasons = []
    for i in range(*bounds):
        try:
            out[i] = resize(source.decode(source.items[i], size), size, prep.resize, prep.interpolation).transpose(2, 0, 1)
            reasons.append("")
        except BadImage as exc:
            reasons.append(str(exc))
    out.flush()
    return reasons


def decode_workers(n_items: int) -> int:
    """Processes for decoding: every core this process may use (at most 8) for a large set."""
    return 1 if n_items < _PARALLEL_FROM else max(1, min(8, len(os.sched_getaffinity(0))))


def _decode_all(source: Source, prep: Preprocessing, out_path: Path, progress: bool) -> list[str]:
    """Decode + resize every item into the N×3×S×S array at `out_path`; a skip reason per item.
    Large sets are decoded by forked worker processes, each writing its own slices of the
    shared memory-mapped file (decoding is CPU-bound Python + libjpeg: threads would not scale)."""
    global _WORK
    n = len(source.items)
    chunks = [(start, min(start + _DECODE_CHUNK, n)) for start in range(0, n, _DECODE_CHUNK)]
    workers = decode_workers(n)
    bar = tqdm(total=n, desc=f"prepare: decoding ({workers} process{'es' if workers > 1 else ''})", unit="img",
               disable=not progress, mininterval=1.0, leave=False)
    _WORK = (source, prep, out_path)
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


def prepare(source: Source, prep: Preprocessing | int, val_fraction: float, test_fraction: float, seed: int,
            out_dir: Path = paths.PREPARED_DIR, progress: bool = False) -> dict:
    """Write `{split}_x.npy` (uint8 N×3×S×S at the preprocessing's stored size), `{split}_y.npy`
    (int64), `manifest.csv` and `meta.json` (classes, counts, the training split's mean/std and
    the completed preprocessing) into `out_dir` (atomically: all or nothing); return the meta
    dict. An int `prep` is a size to train from scratch at (the data set's statistics)."""
    if isinstance(prep, int):
        prep = Preprocessing(prep, prep)
    image_size = prep.stored_size
    classes = source.classes
    if len(classes) < 2:
        raise UserError(f"the data set has {len(classes)} class(es) ({', '.join(classes) or 'none'}); at least 2 are needed")
    with atomic_dir(out_dir) as tmp:
        all_x = open_memmap(tmp / "_decoded.npy", mode="w+", dtype=np.uint8,
                            shape=(len(source.items), 3, image_size, image_size))
        all_x.flush()  # the header and size on disk, before the workers map the file
        reasons = _decode_all(source, prep, tmp / "_decoded.npy", progress)
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
        meta = {"classes": classes, "counts": {s: int(len(splits[s])) for s in SPLITS}, "mean": mean, "std": std,
                "preprocessing": prep.with_stats(mean, std).to_dict()}
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


