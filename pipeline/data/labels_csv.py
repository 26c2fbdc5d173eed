"""Multi-label data (task=multilabel): the user's images with their labels in a CSV.

    data_dir/labels.csv          path,labels[,split]
                                 images/0001.jpg,cat;dog,train
                                 images/0002.jpg,,test          (no label: a negative for every one)

`path` is relative to data_dir; `labels` are joined by data.label_separator; `split` (optional)
keeps a split made by the data set's maker (train | val | test; empty: prepare splits it). Every
row ends up in the manifest, used or skipped with its reason (an empty path, a path listed twice,
a missing file, not an image, an unknown label or split, a byte-identical copy of another row's
file, and copies with different labels), as the class-folder layout reports its files
(`pipeline.data.folder`). Labels become a k-hot uint8 row per image (`Source.labels`, N×C).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import UserError
from pipeline.core.images import decode_image
from pipeline.data.folder import SPLIT_NAMES, _read_hash, byte_copies, file_problem, walk_files
from pipeline.data.source import Source

COLUMNS = ("path", "labels")


def read_table(root: Path, csv_name: str) -> pd.DataFrame:
    """The CSV as strings (nothing parsed as numbers or NaN), with its columns checked."""
    path = root / csv_name
    key = f"data.labels_csv={csv_name!r}"
    if not path.is_file():
        raise UserError(f"{path} is missing: task=multilabel reads the labels from {key} inside data_dir; write it "
                        "(columns path,labels[,split]) or point data.labels_csv at it")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path} is not a readable CSV ({str(exc).splitlines()[0][:100]}); "
                        "expected columns path,labels[,split]") from None
    table.columns = [c.strip().lower() for c in table.columns]
    if missing := [c for c in COLUMNS if c not in table.columns]:
        raise UserError(f"{path} has no {' or '.join(missing)} column (its columns: {', '.join(table.columns) or 'none'}); "
                        "expected a header path,labels[,split]")
    return table


def _row_labels(text: str, sep: str) -> list[str]:
    return sorted({t.strip() for t in text.split(sep) if t.strip()})


def _row_problem(rel: str, labels: list[str], split: str, root: Path, seen: set[str], vocabulary: set[str] | None) -> str:
    """Why a row of the CSV cannot be used before its file is read; '' when it can."""
    if not rel:
        return "empty row: no path"
    if rel in seen:
        return "listed twice in the labels CSV (the first row kept)"
    if split.lower() not in SPLIT_NAMES and split:
        return f"unknown split {split!r} (train, val or test)"
    if vocabulary is not None and (unknown := [t for t in labels if t not in vocabulary]):
        return f"unknown label {', '.join(map(repr, unknown))} (not in data.classes)"
    full = root / rel
    if not full.exists() and not full.is_symlink():
        return "missing file"
    return file_problem(str(full), rel)


def load_multilabel(root: Path, csv_name: str, sep: str, classes: list[str] | None = None) -> Source:
    """Every row of `root/csv_name` as a candidate image with its k-hot labels; what cannot be
    used is skipped with its reason (`Source.skipped`)."""
    if not root.is_dir():
        raise UserError(f"data_dir={str(root)!r} is not a folder; point data_dir at the folder that holds your images "
                        f"and {csv_name}")
    table = read_table(root, csv_name)
    splits = table["split"].str.strip() if "split" in table.columns else pd.Series("", index=table.index)
    vocabulary = set(classes) if classes is not None else None
    seen: set[str] = set()
    rows, skipped = [], []
    for rel, text, split in zip(table["path"].str.strip(), table["labels"], splits):
        rel = rel.replace("\\", "/")
        labels = _row_labels(text, sep)
        reason = _row_problem(rel, labels, split, root, seen, vocabulary)
        digest = ""
        if not reason:
            try:
                digest = _read_hash(os.path.join(root, rel)) or ""
                reason = "" if digest else "empty file"
            except OSError as exc:
                reason = f"unreadable: {exc.strerror}"
        seen.add(rel)
        split = SPLIT_NAMES.get(split.lower(), "")
        if reason:
            skipped.append({"path": rel, "class": sep.join(labels), "split": split, "reason": reason, "hash": digest})
        else:
            rows.append((split, rel, labels, digest))
    drop, conflicts = byte_copies([(split, rel, sep.join(labels), digest) for split, rel, labels, digest in rows])
    skipped += [{"path": rows[i][1], "class": sep.join(rows[i][2]), "split": rows[i][0], "reason": why,
                 "hash": rows[i][3]} for i, why in sorted(drop.items())]
    rows = [r for i, r in enumerate(rows) if i not in drop]
    names = classes if classes is not None else sorted({t for _, _, labels, _ in rows for t in labels})
    if len(names) < 2:
        raise UserError(f"{root / csv_name} names {len(names)} label(s) on usable images ({', '.join(names) or 'none'}); "
                        "task=multilabel needs at least 2")
    index = {c: k for k, c in enumerate(names)}
    y = np.zeros((len(rows), len(names)), dtype=np.uint8)
    for i, (_, _, labels, _) in enumerate(rows):
        y[i, [index[t] for t in labels]] = 1
    listed = {rel for _, rel, _, _ in rows} | {s["path"] for s in skipped}
    unlisted = [rel for rel in walk_files(str(root)) if rel.replace(os.sep, "/") not in listed
                and not file_problem(os.path.join(root, rel), rel)]
    presplit = any(split for split, _, _, _ in rows)
    return Source(classes=list(names), items=[root / rel for _, rel, _, _ in rows], labels=y, decode=decode_image,
                  splits=[split for split, _, _, _ in rows] if presplit else None,
                  names=[rel for _, rel, _, _ in rows], hashes=[digest for *_, digest in rows], skipped=skipped,
                  notes={"layout": f"labels CSV ({csv_name}){', pre-split' if presplit else ''}",
                         "duplicates": sum(why.startswith("duplicate") for why in drop.values()),
                         "conflicting_images": conflicts, "images_not_in_labels_csv": len(unlisted),
                         "label_separator": sep})


def label_count(root: Path, csv_name: str, sep: str, classes: list[str] | None = None) -> int:
    """How many labels the data set has, from the CSV alone (no image read): for the check stage."""
    if classes is not None:
        return len(classes)
    table = read_table(root, csv_name)
    return len({t for text in table["labels"] for t in _row_labels(text, sep)})
