"""The user's own images as a data set: class folders, in either layout.

    root/<class>/**/*.jpg                       split by prepare (stratified, seeded)
    root/{train, val|valid|validation, test}/<class>/**/*.jpg   splits kept; missing ones carved out of train

Every file under a class folder is considered and ends up in the manifest: used, or skipped
with its reason (hidden file, not an image extension, empty file, duplicate, conflicting
labels here; truncated / corrupt / unreadable when prepare decodes it). Files are read once
here to hash them (sha256 of the bytes: duplicates and conflicting labels) and decoded once
by prepare; the OS page cache makes the second read cheap. `scan` lists the same files without
reading them: the check stage refuses a folder prepare would refuse before any output is touched.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.images import decode_image
from pipeline.data.source import Source

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


def loop_target(path: str) -> str:
    """The folder a symbolic link at `path` points back to when that folder contains the link
    (following it would walk the same tree forever): shown as the ancestor as written in
    `path` where one is it, else its real path. '' when `path` is no such link."""
    if not os.path.islink(path):
        return ""
    target, here = os.path.realpath(path), os.path.realpath(os.path.dirname(path) or ".")
    if os.path.commonpath([target, here]) != target:
        return ""
    parent = os.path.dirname(path)
    while os.path.realpath(parent or ".") != target:
        if (up := os.path.dirname(parent)) == parent:  # "" or "/": the target lies above what `path` names
            return target
        parent = up
    return parent or "."


def _refuse_loop(path: str) -> None:
    if target := loop_target(path):
        raise UserError(f"{path} is a link back to {target}: a loop; remove it")


def walk_files(folder: str) -> list[str]:
    """Every file under `folder`, as paths relative to it, in a stable order (by path parts);
    a link back to a folder that contains it (a loop) is a UserError naming it; a folder
    reached twice through other symbolic links is walked once; a link to nothing is listed
    (reported as skipped). os.scandir, not pathlib: for 60,000 files pathlib's object
    overhead was most of the scan."""
    _refuse_loop(folder)
    out: list[str] = []
    stack, seen = [""], {os.path.realpath(folder)}
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir)) as entries:
            for e in entries:
                rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
                if e.is_dir(follow_symlinks=True):
                    if e.is_symlink():
                        _refuse_loop(e.path)
                    if (real := os.path.realpath(e.path)) not in seen:
                        seen.add(real)
                        stack.append(rel)
                elif e.is_file(follow_symlinks=True) or (e.is_symlink() and not os.path.exists(e.path)):
                    out.append(rel)
    return sorted(out, key=lambda r: r.split(os.sep))


def name_problem(rel: str) -> str:
    """Why a file found under a folder (path relative to it) is no image by its name alone:
    'hidden file' (it or a folder above it starts with '.'), 'not an image extension', or ''."""
    if rel.startswith(".") or os.sep + "." in rel:
        return "hidden file"
    _, dot, extension = rel.rpartition(".")
    return "" if dot and "." + extension.lower() in EXTENSIONS else "not an image extension"


def _read_hash(path: str) -> str:
    """sha256 of the file's bytes; '' for an empty file."""
    with open(path, "rb") as fh:
        data = fh.read()
    return hashlib.sha256(data).hexdigest() if data else ""


ClassFolder = tuple[str, str, str, list[tuple[str, str]]]
# (split, class, the folder relative to root, [(a file under it relative to root, why it is no image or '')])


def file_problem(path: str, name: str) -> str:
    """Why a listed file (at `path`; `name`: its path under its class folder) is no candidate
    image before it is read: its name (`name_problem`), a link to nothing, no bytes; '' if it is one."""
    if reason := name_problem(name):
        return reason
    try:
        return "" if os.path.getsize(path) else "empty file"
    except FileNotFoundError:
        return "dangling symbolic link"  # listed by walk_files, yet nothing there
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def list_class_folders(root: Path) -> list[ClassFolder]:
    """Every class folder under `root` (either layout) and every file under it with its problem:
    the one listing the check stage's `scan` and prepare's `scan_folder` share. Lists and stats
    files; reads none."""
    if not root.is_dir():
        raise UserError(f"data_dir={str(root)!r} is not a folder; expected root/<class>/*.jpg "
                        "or root/train|val|test/<class>/*.jpg")
    listed = []
    try:
        for split, cls, folder in _class_dirs(root):
            rel, path = str(folder.relative_to(root)) + os.sep, str(folder) + os.sep  # joined by +: 60,000 files
            files = [(rel + name, file_problem(path + name, name)) for name in walk_files(str(folder))]
            listed.append((split, cls, rel[:-1], files))
    except OSError as exc:
        raise UserError(f"cannot list {exc.filename or root}: {exc.strerror or exc}; make data_dir={str(root)!r} "
                        "readable") from None
    return listed


def _classes(root: Path, listed: list[ClassFolder]) -> list[str]:
    """The class folders with files (an empty one is noted in the report, not a class); refused:
    none, fewer than 2, or one whose files hold no candidate image."""
    where = f"data_dir={str(root)!r}"
    need = f"it needs at least 2 class folders, each with at least one image ({', '.join(sorted(EXTENSIONS))})"
    if not listed:
        raise UserError(f"{where} has no class folders (root/<class>/*.jpg or root/train|val|test/<class>/*.jpg); "
                        f"{need}")
    classes = sorted({cls for _, cls, _, files in listed if files})
    if len(classes) < 2:
        raise UserError(f"{where} has {len(classes)} class folder(s) with files ({', '.join(classes) or 'none'}); "
                        f"{need}")
    with_image = {cls for _, cls, _, files in listed if any(not problem for _, problem in files)}
    if bare := [(rel, files) for _, cls, rel, files in listed if files and cls not in with_image]:
        why = sorted({problem for _, files in bare for _, problem in files})
        raise UserError(f"{where}: class folder {', '.join(rel for rel, _ in bare)} has no image (only: "
                        f"{', '.join(why)}); {need}")
    return classes


def scan(root: Path) -> dict[str, int]:
    """Candidate images per class, from the listing alone (names and sizes; nothing read or
    decoded), refusing what prepare would refuse for the same reasons: for the check stage,
    which runs before DVC removes prepare's outputs. 5,000 files: ~30 ms."""
    listed = list_class_folders(root)
    counts = dict.fromkeys(_classes(root, listed), 0)
    for _, cls, _, files in listed:
        if cls in counts:
            counts[cls] += sum(not problem for _, problem in files)
    return counts


def byte_copies(files: list[tuple[str, str, str, str]]) -> tuple[dict[int, str], int]:
    """Files (split, path, label, sha256) with the same bytes: with the same label all but the
    first (train before val before test, then by path) are duplicates; with different labels
    every copy conflicts. Returns ({position: why it is dropped}, how many conflicting pictures)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (*_, digest) in enumerate(files):
        by_hash[digest].append(i)
    drop: dict[int, str] = {}
    conflicts = 0
    for idx in by_hash.values():
        labels = sorted({files[i][2] for i in idx})
        if len(labels) > 1:
            conflicts += 1
            drop.update({i: f"conflicting labels: {', '.join(lb or '(none)' for lb in labels)}" for i in idx})
        elif len(idx) > 1:
            first = min(idx, key=lambda i: (SPLIT_ORDER[files[i][0]], files[i][1]))
            drop.update({i: f"duplicate of {files[first][1]}" for i in idx if i != first})
    return drop, conflicts


def scan_folder(root: Path) -> Source:
    """Find every candidate image under `root`, hash it, and set aside what cannot be used
    before decoding: hidden files, other extensions, empty files, duplicates, conflicts."""
    listed = list_class_folders(root)
    classes = _classes(root, listed)
    stray = sorted(str(p.relative_to(root)) for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    skipped: list[dict] = []
    candidates: list[tuple[str, str, str, str]] = []  # split, class, path relative to root, hash
    empty_dirs = [rel for _, _, rel, files in listed if not files]
    for split, cls, _, files in listed:
        for rel, reason in files:
            if not reason:
                try:
                    if digest := _read_hash(os.path.join(root, rel)):
                        candidates.append((split, cls, rel, digest))
                        continue
                    reason = "empty file"
                except OSError as exc:
                    reason = f"unreadable: {exc.strerror}"
            skipped.append({"path": rel, "class": cls, "split": split, "reason": reason, "hash": ""})

    drop, conflicts = byte_copies([(split, rel, cls, digest) for split, cls, rel, digest in candidates])
    for i, reason in drop.items():
        split, cls, rel, digest = candidates[i]
        skipped.append({"path": rel, "class": cls, "split": split, "reason": reason, "hash": digest})
    kept = [c for i, c in enumerate(candidates) if i not in drop]
    index = {c: k for k, c in enumerate(classes)}
    layout = "pre-split" if any(split for split, _, _, _ in listed) else "class folders"
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
