"""Data sets → prepared splits.

`download` materialises a data set under data/raw/; `load_source` turns it into a `Source`
(candidate images + labels); `prepare` decodes every image exactly once, resizes it to
`image_size`, finds exact and near-duplicates over all of them (`pipeline.data.duplicates`),
assigns seeded stratified train/val/test splits that keep each group of duplicates (and of
data.group_by) whole, keeping a set's own splits where it has them and reporting what leaks
across those (`pipeline.data.groups`), computes per-channel mean/std on the train split only,
and writes compact uint8 N×3×S×S `.npy` arrays that training memory-maps, plus a manifest of
every file considered, from which the data card is drawn.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.images import BadImage, resize
from pipeline.core.io import atomic_dir, write_json
from pipeline.core.preprocess import Preprocessing
from pipeline.data.duplicates import THUMB, components, exact_pairs, fingerprint, near_pairs
from pipeline.data.groups import leakage, path_groups, split_indices
from pipeline.data.source import SPLITS, Source

if TYPE_CHECKING:
    from pipeline.core.params import DataParams

_CHUNK = 4096  # images per chunk when copying or reducing memory-mapped arrays


# ---------------------------------------------------------------- prepare


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of a uint8 N×C×H×W array, read in chunks so a
    memory-mapped array is never loaded whole. Sums come from each channel's histogram of the 256
    values: exact integers (the same numbers float64 sums of the pixels give) at ~4× the speed
    of converting the pixels to float64 (1.2 s → 0.3 s for 3,000 images at 64 px)."""
    c = x.shape[1]
    counts = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, len(x), _CHUNK):
        chunk = np.asarray(x[start:start + _CHUNK])
        for channel in range(c):
            counts[channel] += np.bincount(chunk[:, channel].ravel(), minlength=256)
    values = np.arange(256, dtype=np.int64)
    count = int(counts[0].sum())
    total, total_sq = (counts @ values).astype(np.float64), (counts @ values**2).astype(np.float64)
    mean = total / count / 255.0
    std = np.sqrt(np.maximum(total_sq / count / 255.0**2 - mean**2, 1e-12))
    return [float(m) for m in mean], [float(s) for s in std]


_DECODE_CHUNK = 256   # images per task handed to a decode worker
_PARALLEL_FROM = 4096  # fewer images than this: decode in-process (a pool costs more than it saves)
_WORK: tuple | None = None  # (source, preprocessing, out path) for forked decode workers


def _decode_range(bounds: tuple[int, int]) -> list[tuple]:
    """Decode items start..stop-1 into the memory-mapped output and their thumbnails into the
    thumbnail file; per item (skip reason, '' = used; pixel digest; width; height; mode)."""
    source, prep, out_path, thumb_path = _WORK
    size = prep.stored_size
    out = np.load(out_path, mmap_mode="r+")
    thumbs = np.load(thumb_path, mmap_mode="r+")
    rows = []
    for i in range(*bounds):
        try:
            image = source.decode(source.items[i], size)
        except BadImage as exc:
            rows.append((str(exc), b"", 0, 0, ""))
            continue
        width, height, mode = describe(image)
        pixels = resize(image, size, prep.resize, prep.interpolation)
        if pixels.ndim == 2:  # a grey array: the same three channels
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        out[i] = pixels.transpose(2, 0, 1)
        digest, thumbs[i] = fingerprint(pixels)
        rows.append(("", digest, width, height, mode))
    out.flush()
    thumbs.flush()
    return rows


def describe(image) -> tuple[int, int, str]:
    """The decoded image's own width, height and mode, before it became RGB and was resized."""
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0], "L" if image.ndim == 2 else {3: "RGB", 4: "RGBA"}.get(image.shape[2], "?")
    width, height, mode = image.info.get("source", (*image.size, image.mode))
    return width, height, mode


def decode_workers(n_items: int) -> int:
    """Processes for decoding: every core this process may use (at most 8) for a large set."""
    return 1 if n_items < _PARALLEL_FROM else max(1, min(8, len(os.sched_getaffinity(0))))


def _decode_all(source: Source, prep: Preprocessing, out_path: Path, thumb_path: Path, progress: bool) -> list[tuple]:
    """Decode + resize every item into the N×3×S×S array at `out_path` and its thumbnail into
    `thumb_path`; per item (skip reason, pixel digest, width, height, mode).
    Large sets are decoded by forked worker processes, each writing its own slices of the
    shared memory-mapped files (decoding is CPU-bound Python + libjpeg: threads would not scale)."""
    global _WORK
    n = len(source.items)
    chunks = [(start, min(start + _DECODE_CHUNK, n)) for start in range(0, n, _DECODE_CHUNK)]
    workers = decode_workers(n)
    bar = tqdm(total=n, desc=f"prepare: decoding ({workers} process{'es' if workers > 1 else ''})", unit="img",
               disable=not progress, mininterval=1.0, leave=False)
    _WORK = (source, prep, out_path, thumb_path)
    try:
        if workers > 1:
            # workers end with SIGTERM when the pool closes: not the stage's handler, which would
            # print a KeyboardInterrupt traceback from each (a kill of the stage still ends them)
            with multiprocessing.get_context("fork").Pool(workers, signal.signal,
                                                          (signal.SIGTERM, signal.SIG_DFL)) as pool:
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
    return [row for part in results for row in part]


def _assign_splits(source: Source, used: np.ndarray, data: DataParams, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Item indices per split: a set's own splits where given, missing ones carved out of train
    (whole groups: `groups` numbers the used items' groups)."""
    given = np.array(source.splits, dtype=object)[used] if source.splits is not None else np.full(len(used), "")
    present = {s for s in SPLITS if (given == s).any()}
    pool = np.flatnonzero((given == "train") | (given == ""))
    need = tuple(s for s in ("val", "test") if s not in present)
    carved = split_indices(source.labels[used][pool], data.val_fraction, data.test_fraction, data.split_seed, need,
                           groups[pool])
    out = {s: used[pool[carved[s]]] if s in carved else used[np.flatnonzero(given == s)] for s in SPLITS}
    return {s: np.sort(v) for s, v in out.items()}


def _find_groups(source: Source, rows: list[tuple], used: np.ndarray, thumbs: np.ndarray, data: DataParams
                 ) -> tuple[np.ndarray, pd.DataFrame]:
    """The group of every used item (near-duplicates and data.group_by joined) and the
    duplicate pairs (item indices a < b, similarity, exact or near)."""
    exact = exact_pairs([rows[i][1] for i in used])
    # images smaller than the thumbnail (8×8 digits) hold too little to tell a copy from a look-alike: exact only
    big = np.flatnonzero([min(rows[i][2], rows[i][3]) >= THUMB for i in used])
    near, similarity = near_pairs(np.asarray(thumbs[used[big]]), data.duplicate_threshold)
    near = big[near]
    source.notes[f"images_under_{THUMB}_px_compared_for_exact_copies_only"] = int(len(used) - len(big))
    is_exact = {(a, b) for a, b in exact}
    pairs = pd.DataFrame({"a": used[near[:, 0]], "b": used[near[:, 1]], "similarity": np.round(similarity, 4),
                          "kind": ["exact" if (a, b) in is_exact else "near" for a, b in near]})
    found = {(a, b) for a, b in near}
    missed = [(a, b) for a, b in exact if (a, b) not in found]  # flat images (no pattern) or under 16 px
    if missed:
        pairs = pd.concat([pairs, pd.DataFrame({"a": used[[a for a, _ in missed]], "b": used[[b for _, b in missed]],
                                                "similarity": 1.0, "kind": "exact"})], ignore_index=True)
    names = list(source.names) if source.names is not None else [str(i) for i in source.items]
    by_path = path_groups([names[i] for i in used], data.group_by)
    position = np.full(len(source.items), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    groups = components(len(used), np.stack([position[pairs["a"].to_numpy()], position[pairs["b"].to_numpy()]], axis=1),
                        by_path)
    return groups, pairs.sort_values(["a", "b"], ignore_index=True)


def _apply_leakage(source: Source, splits: dict[str, np.ndarray], item_group: np.ndarray, mode: str,
                   reasons: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The val and test items whose group has a member in an earlier split (possible only where
    the data set came split); by data.leakage: reported, dropped from test (its reason in
    `reasons`) or refused."""
    order = np.concatenate([splits[s] for s in SPLITS])
    split_of = np.concatenate([np.full(len(splits[s]), s, dtype=object) for s in SPLITS])
    leaked = {s: order[idx] for s, idx in leakage(split_of, item_group[order]).items()}
    if mode == "error" and (n := len(leaked["test"]) + len(leaked["val"])):
        names = list(source.names) if source.names is not None else [str(i) for i in source.items]
        example = names[(leaked["test"] if len(leaked["test"]) else leaked["val"])[0]]
        raise UserError(f"{n} val/test images have a near-duplicate or group member in an earlier split (e.g. "
                        f"{example}); move or remove them, or set data.leakage to report or drop_from_test")
    if mode == "drop_from_test" and len(leaked["test"]):
        for i in leaked["test"]:
            reasons[i] = "near-duplicate or group member in train/val, dropped from test (data.leakage)"
        splits = dict(splits, test=np.setdiff1d(splits["test"], leaked["test"]))
        leaked = dict(leaked, test=leaked["test"][:0])
    return splits, leaked


def prepare(source: Source, prep: Preprocessing | int, data: DataParams, out_dir: Path = paths.PREPARED_DIR,
            progress: bool = False) -> dict:
    """Write `{split}_x.npy` (uint8 N×3×S×S at the preprocessing's stored size), `{split}_y.npy`
    (int64), `{split}_group.npy` (the group of each image: near-duplicates and data.group_by),
    `manifest.csv`, `duplicates.csv` (every duplicate pair) and `meta.json` (classes, counts,
    the training split's mean/std, the completed preprocessing, what leaked) into `out_dir`
    (atomically: all or nothing); return the meta dict. An int `prep` is a size to train from
    scratch at (the data set's statistics)."""
    if isinstance(prep, int):
        prep = Preprocessing(prep, prep)
    image_size = prep.stored_size
    classes = source.classes
    multilabel = source.labels.ndim == 2
    if len(classes) < 2:
        raise UserError(f"the data set has {len(classes)} class(es) ({', '.join(classes) or 'none'}); at least 2 are needed")
    with atomic_dir(out_dir) as tmp:
        all_x = open_memmap(tmp / "_decoded.npy", mode="w+", dtype=np.uint8,
                            shape=(len(source.items), 3, image_size, image_size))
        thumbs = open_memmap(tmp / "_thumbs.npy", mode="w+", dtype=np.uint8, shape=(len(source.items), THUMB, THUMB, 3))
        all_x.flush()  # the header and size on disk, before the workers map the files
        thumbs.flush()
        rows = _decode_all(source, prep, tmp / "_decoded.npy", tmp / "_thumbs.npy", progress)
        reasons = [r[0] for r in rows]
        used = np.array([i for i, r in enumerate(reasons) if not r], dtype=np.int64)
        counts = label_counts(source.labels[used], len(classes))
        if empty := [classes[k] for k in np.flatnonzero(counts == 0)]:
            fix = "add images or remove it from data.classes" if multilabel else "add images or remove the class folder"
            raise UserError(f"{'label' if multilabel else 'class'} {', '.join(map(repr, empty))} has no usable image; {fix}")
        groups, pairs = _find_groups(source, rows, used, thumbs, data)
        del thumbs
        item_group = np.full(len(source.items), -1, dtype=np.int64)
        item_group[used] = groups
        splits = _assign_splits(source, used, data, groups)
        splits, leaked = _apply_leakage(source, splits, item_group, data.leakage, reasons)
        if empty := [s for s in SPLITS if len(splits[s]) == 0]:
            raise UserError(f"the {'/'.join(empty)} split would be empty; add images or change data.val_fraction/test_fraction")
        for name, idx in splits.items():
            x = open_memmap(tmp / f"{name}_x.npy", mode="w+", dtype=np.uint8, shape=(len(idx), 3, image_size, image_size))
            for start in range(0, len(idx), _CHUNK):
                x[start:start + _CHUNK] = all_x[idx[start:start + _CHUNK]]
            x.flush()
            np.save(tmp / f"{name}_y.npy", source.labels[idx] if multilabel else source.labels[idx].astype(np.int64))
            np.save(tmp / f"{name}_group.npy", item_group[idx])
        del all_x
        (tmp / "_decoded.npy").unlink()
        (tmp / "_thumbs.npy").unlink()
        mean, std = channel_stats(np.load(tmp / "train_x.npy", mmap_mode="r"))
        manifest = _manifest(source, rows, reasons, splits, item_group)
        manifest.to_csv(tmp / paths.MANIFEST.name, index=False)
        _pair_table(pairs, manifest).to_csv(tmp / paths.DUPLICATES.name, index=False)
        meta = {"classes": classes, "counts": {s: int(len(splits[s])) for s in SPLITS}, "mean": mean, "std": std,
                "preprocessing": prep.with_stats(mean, std).to_dict(),
                "leaked": {s: int(len(v)) for s, v in leaked.items()},
                "content_hash": _content_hash(manifest, rows)}
        if multilabel:  # absent for one class per image: its meta.json as before
            meta["task"] = "multilabel"
        write_json(tmp / paths.PREPARED_META.name, meta)
    return meta


def label_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Images per class (int64 class per image) or positives per label (k-hot N×C rows)."""
    return labels.sum(axis=0).astype(np.int64) if labels.ndim == 2 else np.bincount(labels, minlength=n)


def class_column(source: Source) -> list[str]:
    """Each item's class, or (multi-label) its labels joined by the CSV's separator."""
    if source.labels.ndim == 1:
        return [source.classes[k] for k in source.labels]
    sep, names = source.notes.get("label_separator", ";"), np.array(source.classes, dtype=object)
    return [sep.join(names[row.astype(bool)]) for row in source.labels]


def _content_hash(manifest: pd.DataFrame, rows: list[tuple]) -> str:
    """sha256 of every used image's path, label and file hash (or, where the data set has no
    files, its pixels' digest): the same for the same images and labels, whatever the split."""
    head = manifest.iloc[:len(rows)]
    digest = pd.Series([r[1].hex() for r in rows], index=head.index)
    key = head["hash"].astype(str).where(head["hash"].astype(str) != "", digest)
    used = head["status"] == "used"
    lines = head["path"].astype(str)[used] + "\t" + head["class"].astype(str)[used] + "\t" + key[used]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _pair_table(pairs: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Every duplicate pair by path and split, most alike first."""
    a, b = manifest.iloc[pairs["a"].to_numpy()], manifest.iloc[pairs["b"].to_numpy()]
    table = pd.DataFrame({"path_a": a["path"].to_numpy(), "split_a": a["split"].to_numpy(), "class_a": a["class"].to_numpy(),
                          "path_b": b["path"].to_numpy(), "split_b": b["split"].to_numpy(), "class_b": b["class"].to_numpy(),
                          "similarity": pairs["similarity"].to_numpy(), "kind": pairs["kind"].to_numpy(),
                          "group": a["group"].to_numpy()})
    return table.sort_values(["similarity", "path_a", "path_b"], ascending=[False, True, True], ignore_index=True)


def _manifest(source: Source, rows: list[tuple], reasons: list[str], splits: dict[str, np.ndarray],
              item_group: np.ndarray) -> pd.DataFrame:
    """One row per file considered: path, class, split, row in the split's arrays, status
    (used/skipped), reason, file hash, group (of near-duplicates and data.group_by), and the
    image's own width, height and mode."""
    split_of = np.full(len(source.items), "", dtype=object)
    row_of = np.full(len(source.items), -1, dtype=np.int64)
    for name, idx in splits.items():
        split_of[idx] = name
        row_of[idx] = np.arange(len(idx))
    given = source.splits if source.splits is not None else [""] * len(source.items)
    used = row_of >= 0
    table = pd.DataFrame({
        "path": list(source.names) if source.names is not None else [str(i) for i in source.items],
        "class": class_column(source),
        "split": [s or g for s, g in zip(split_of, given)],
        "row": np.where(used, row_of, -1),
        "status": np.where(used, "used", "skipped"),
        "reason": reasons,
        "hash": list(source.hashes) if source.hashes is not None else "",
        "group": np.where(used, item_group, -1),
        "width": [r[2] for r in rows], "height": [r[3] for r in rows], "mode": [r[4] for r in rows],
    })
    if source.skipped:
        table = pd.concat([table, pd.DataFrame(source.skipped).assign(status="skipped", row=-1, group=-1, width=0, height=0, mode="")],
                          ignore_index=True)
    return table.fillna("")
