"""The user's own images as a data set: class folders, in either layout.

    root/<class>/**/*.jpg                       split by prepare (stratified, seeded)
    root/{train, val|valid|validation, test}/<class>/**/*.jpg   splits kept; missing ones carved out of train

Every file under a class folder is considered and ends up in the manifest: used, or skipped
with its reason (hidden file, not an image extension, empty file, duplicate, conflicting
labels here; truncated / corrupt / unreadable when prepare decodes it). Files are read once
here to hash them (sha256 of the bytes: duplicates and conflicting labels) and decoded once
by prepare; the OS page cache makes the second read cheap.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.data.source import Source
from pipeline.errors import UserError
from pipeline.images import decode_image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2, "": 0}


def _class_dirs(root: Path) -> list[tuple[str, str, Path]]:
    """(split, class, folder) for every class folder; split '' in the unsplit layout."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = {d.name.lower(): d for d in dirs if d.name.lower() in SPLIT_NAMES}
    if splits:
        return [(SPLIT_NAMES[name], c.name, c) for name, d in sorted(splits.items(), key=lambda kv: SPLIT_ORDER[SPLIT_NAMES[kv[0]]])
                for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    return [("", d.name, d) for d in dirs]


def class_names(root: Path) -> list[str]:
    """The class folder names under `root` (either layout), without listing their files."""
    return sorted({cls for _, cls, _ in _class_dirs(root)})


def walk_files(folder: str) -> list[str]:
    """Every file under `folder`, as paths relative to it, in a stable order (by path parts);
    a folder reached twice through symbolic links (a loop) is walked once, and a link to
    nothing is listed (reported as skipped). os.scandir, not pathlib: for 60,000 files
    pathlib's object overhead was most of the scan."""
    out: list[str] = []
    stack, seen = [""], {os.path.realpath(folder)}
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir)) as entries:
            for e in entries:
                rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
                if e.is_dir(follow_symlinks=True):
                    if (real := os.path.realpath(e.path)) not in seen:
                        seen.add(real)
                        stack.append(rel)
                elif e.is_file(follow_symlinks=True) or (e.is_symlink() and not os.path.exists(e.path)):
                    out.append(rel)
    return sorted(out, key=lambda r: r.split(os.sep))


def name_problem(rel: str) -> str:
    """Why a file found under a folder (path relative to it) is no image by its name alone:
    'hidden file' (it or a folder above it starts with '.'), 'not an image extension', or ''."""
    if any(part.startswith(".") for part in rel.split(os.sep)):
        return "hidden file"
    return "not an image extension" if os.path.splitext(rel)[1].lower() not in EXTENSIONS else ""


def _read_hash(path: str) -> str:
    """sha256 of the file's bytes; '' for an empty file."""
    with open(path, "rb") as fh:
        data = fh.read()
    return hashlib.sha256(data).hexdigest() if data else ""


def scan_folder(root: Path) -> Source:
    """Find every candidate image under `root`, hash it, and set aside what cannot be used
    before decoding: hidden files, other extensions, empty files, duplicates, conflicts."""
    if not root.is_dir():
        raise UserError(f"data_dir={str(root)!r} is not a folder; expected root/<class>/*.jpg "
                        "or root/train|val|test/<class>/*.jpg")
    class_dirs = _class_dirs(root)
    stray = sorted(str(p.relative_to(root)) for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    skipped: list[dict] = []
    candidates: list[tuple[str, str, str, str]] = []  # split, class, path relative to root, hash
    files_per_class: dict[str, int] = defaultdict(int)
    empty_dirs = []
    for split, cls, folder in class_dirs:
        files = walk_files(str(folder))
        folder_rel = str(folder.relative_to(root))
        if not files:
            empty_dirs.append(folder_rel)
            continue
        files_per_class[cls] += len(files)
        for name in files:
            rel = os.path.join(folder_rel, name)
            reason = name_problem(name)
            if not reason and not os.path.exists(os.path.join(root, rel)):
                reason = "dangling symbolic link"
            if not reason:
                try:
                    if digest := _read_hash(os.path.join(root, rel)):
                        candidates.append((split, cls, rel, digest))
                        continue
                    reason = "empty file"
                except OSError as exc:
                    reason = f"unreadable: {exc.strerror}"
            skipped.append({"path": rel, "class": cls, "split": split, "reason": reason, "hash": ""})
    classes = sorted(files_per_class)
    if not class_dirs:
        raise UserError(f"data_dir={str(root)!r} has no class folders; expected root/<class>/*.jpg "
                        "or root/train|val|test/<class>/*.jpg")
    if len(classes) < 2:
        raise UserError(f"data_dir={str(root)!r} has {len(classes)} class folder(s) with files "
                        f"({', '.join(classes) or 'none'}); at least 2 classes are needed")

    # Duplicates (same bytes, same class): keep the first; conflicts (same bytes, other classes): skip all.
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, _, digest) in enumerate(candidates):
        by_hash[digest].append(i)
    drop: dict[int, str] = {}
    conflicts = 0
    for digest, idx in by_hash.items():
        labels = sorted({candidates[i][1] for i in idx})
        if len(labels) > 1:
            conflicts += 1
            drop.update({i: f"conflicting labels: {', '.join(labels)}" for i in idx})
        elif len(idx) > 1:
            first = min(idx, key=lambda i: (SPLIT_ORDER[candidates[i][0]], candidates[i][2]))
            drop.update({i: f"duplicate of {candidates[first][2]}" for i in idx if i != first})
    for i, reason in drop.items():
        split, cls, rel, digest = candidates[i]
        skipped.append({"path": rel, "class": cls, "split": split, "reason": reason, "hash": digest})
    kept = [c for i, c in enumerate(candidates) if i not in drop]
    index = {c: k for k, c in enumerate(classes)}
    layout = "pre-split" if any(s for s, _, _ in class_dirs) else "class folders"
    return Source(
        classes=classes,
        items=[root / rel for _, _, rel, _ in kept],
        labels=np.array([index[cls] for _, cls, _, _ in kept], dtype=np.int64),
        decode=decode_image,
        splits=[split for split, _, _, _ in kept] if layout == "pre-split" else None,
        names=[rel for _, _, rel, _ in kept],
        hashes=[digest for _, _, _, digest in kept],
        skipped=skipped,
        notes={"layout": layout, "duplicates": sum(r.startswith("duplicate") for r in drop.values()),
               "conflicting_images": conflicts, "empty_class_folders": empty_dirs, "stray_files": stray},
    )
