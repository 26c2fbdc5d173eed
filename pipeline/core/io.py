"""Atomic writes: every output is written under a temporary name and renamed when complete,
so an interrupted or failed stage never leaves a half-written file behind. The temporary names
of a killed stage (`kill -9` skips every cleanup) are removed by the next write of the same
output, and outputs get the mode the umask gives (mkstemp's 0600 otherwise)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(folder: Path, prefix: str, suffix: str) -> None:
    """Temporary files or folders of an earlier write of the same output that was killed."""
    for stale in folder.glob(f"{prefix}*{suffix}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that look at it work);
    on success rename it onto `path`, on failure delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.stem}.", f".tmp{path.suffix}"
    _remove_leftovers(path.parent, prefix, suffix)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _no_space_is_one_line(path):
            yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made, with its folder, if missing) while the
    block runs: processes that take the same lock run the block one at a time. OSError when the
    file cannot be made (a read-only folder)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "the file is too large (over the file-size limit: ulimit -f)"}


@contextmanager
def _no_space_is_one_line(path: Path) -> Iterator[None]:
    """A full disk while writing `path`: a `UserError` naming the file (the output is left as it was)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        from pipeline.core.errors import UserError

        raise UserError(f"cannot write {path}: {FULL[exc.errno]}; free some space (df -h {path.parent}) "
                        "and run again") from None


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through memory: the same object gives the same bytes (torch names the zip's
    root folder after the file it writes, here a random temporary name; a buffer's is
    "archive"), and a full disk is an OSError of the write (`atomic_path` says it in one
    line), not torch's "enforce fail at inline_container.cc"."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.name}.", ".tmp"
    _remove_leftovers(path.parent, prefix, suffix)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def files_sha256(files) -> str:
    """sha256 of the files' bytes, one after the other, read in 1 MB chunks."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return files_sha256([path])


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
