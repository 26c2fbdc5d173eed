"""The torchvision data sets (cifar10, cifar100, mnist, fashion_mnist): md5-verified download
into data/raw/, safe extraction, and a reader of the real files (CIFAR pickles, MNIST IDX).

Where the files come from (URLs, mirrors, file names, md5s) is read from torchvision's own
dataset classes, so it stays what torchvision uses. Reading does not go through torchvision's
`Dataset` classes: we read the extracted files in their published format with numpy/pickle.
The CIFAR pickles are read only once their md5s are the ones torchvision lists (a file placed
beside a hand-written marker is refused unread), and then by an unpickler that builds only what
those files hold (dicts, lists, strings, ints, numpy arrays) and refuses any other call.

Nothing half-done ever counts as done: a download goes to a temporary name and is renamed
once its md5 matches; an extraction goes to a temporary folder that is renamed, complete with
its marker file, at the end. A file placed in data/raw/ by hand (no network) is verified and
used, never deleted. Tar archives are extracted with tarfile's `data` filter.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST
from torchvision.datasets.utils import check_integrity
from tqdm import tqdm

from pipeline.core.errors import UserError
from pipeline.core.io import atomic_dir, atomic_path
from pipeline.data.source import Source

TIMEOUT_S = 30       # per socket operation: an offline machine fails in seconds, not minutes
MARKER = ".complete"  # written last into an extraction folder: {file name: md5} it came from
_CHUNK = 1 << 20      # bytes per read when downloading and hashing


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    md5: str
    urls: tuple[str, ...]  # mirrors, tried in order


@dataclass(frozen=True)
class TvSpec:
    files: tuple[RemoteFile, ...]
    read: Callable[[str, Path], Source]  # (data set name, its extracted folder) → Source
    checked: tuple[tuple[str, str], ...] = ()  # (path in the extracted folder, md5): verified before each read


# ---------------------------------------------------------------- readers


def _text(value: Any) -> str:
    """A key or name from a pickle: bytes (loaded with encoding='bytes') or str (latin1)."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes, and nothing else."""
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something no CIFAR file holds."""


_ARRAY = np.ndarray((0,), np.uint8).__reduce__()[0]  # numpy's array rebuilder (numpy.core or numpy._core)
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY,  # the real files: numpy 1.x, Python 2 cPickle
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY,  # the same files written again by numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,  # bytes in a Python 3 protocol-2 pickle
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, ints and numpy arrays; any other global (a planted file's
    os.system, eval, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return _PICKLE_GLOBALS[(module, name)]


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR file (a Python 2 cPickle of a dict) with its keys as str."""
    redo = f"delete {path.parent.parent}/ and re-run the download stage"
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {redo}") from None
    except _Refused as exc:
        raise UserError(f"{path} asks to call {exc} when read, which no CIFAR file does: refused, nothing run; "
                        f"{redo}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise UserError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); {redo}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR file; {redo}")
    return {_text(k): v for k, v in obj.items()}


def _verify(folder: Path, checked: tuple[tuple[str, str], ...]) -> None:
    """The files that are about to be unpickled are the ones torchvision lists (by md5)."""
    for rel, md5 in checked:
        path = folder / rel
        if not path.is_file():
            raise UserError(f"{path} is missing; delete {folder}/ and re-run the download stage")
        if not check_integrity(path, md5):
            raise UserError(f"{path} is not the file the archive holds (md5 {md5sum(path)}, expected {md5}); "
                            f"refused unread: delete {folder}/ and re-run the download stage")


def _read_cifar(name: str, folder: Path, base: str, train: list, test: list, meta: dict) -> Source:
    """CIFAR python version: uint8 N×3072 rows (R, G, B planes of 32×32), labels per batch."""
    parts, labels, splits = [], [], []
    for split, files in (("train", train), ("test", test)):
        for filename, _md5 in files:
            batch = _unpickle(folder / base / filename)
            data = np.asarray(batch.get("data"), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise UserError(f"{folder / base / filename} holds no N×3072 image rows; delete {folder}/ "
                                "and re-run the download stage")
            parts.append(data.reshape(-1, 3, 32, 32))
            labels += batch["labels"] if "labels" in batch else batch["fine_labels"]
            splits += [split] * len(parts[-1])
    classes = [_text(c) for c in _unpickle(folder / base / meta["filename"])[meta["key"]]]
    images = np.concatenate(parts)  # N×3×32×32 uint8: 180 MB for CIFAR-10, no float copy
    del parts
    return _source(name, folder, classes, np.asarray(labels, dtype=np.int64), splits, len(images),
                   decode=lambda i, _size: np.ascontiguousarray(images[i].transpose(1, 2, 0)))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (MNIST format) of uint8 with `ndim` dimensions, big-endian header."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; delete {path.parent}/ and re-run the download stage") from None
    if len(data) < 4 + 4 * ndim or data[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(f"{path} is not a uint8 IDX file with {ndim} dimensions; delete {path.parent}/ "
                        "and re-run the download stage")
    dims = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    if len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        raise UserError(f"{path} is truncated or has extra bytes; delete {path.parent}/ and re-run the download stage")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_mnist(name: str, folder: Path, classes: list[str]) -> Source:
    """MNIST-format set: train-/t10k- images (N×28×28) and labels, grey (prepare makes 3 equal channels)."""
    images = np.concatenate([_read_idx(folder / f"{p}-images-idx3-ubyte", 3) for p in ("train", "t10k")])
    labels = [_read_idx(folder / f"{p}-labels-idx1-ubyte", 1) for p in ("train", "t10k")]
    splits = ["train"] * len(labels[0]) + ["test"] * len(labels[1])
    return _source(name, folder, classes, np.concatenate(labels).astype(np.int64), splits, len(images),
                   decode=lambda i, _size: images[i])  # grey: prepare repeats it into RGB


def _source(name: str, folder: Path, classes: list[str], labels: np.ndarray, splits: list[str], n_images: int,
            decode: Callable[[int, int], np.ndarray]) -> Source:
    """Items are indices 0..N-1 (train first, then test); names like cifar10/test/00042."""
    in_range = n_images == 0 or 0 <= labels.min() <= labels.max() < len(classes)
    if not (len(labels) == len(splits) == n_images and in_range):
        raise UserError(f"the files in {folder}/ disagree (image/label counts or label range); delete it "
                        "and its archive(s) beside it, and re-run the download stage")
    counts = {"train": 0, "test": 0}
    names = []
    for split in splits:
        names.append(f"{name}/{split}/{counts[split]:05d}")
        counts[split] += 1
    return Source(classes, range(len(labels)), labels, decode, splits=splits, names=names)


def _files(mirrors: list[str], resources: list[tuple[str, str]]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f, md5, tuple(m + f for m in mirrors)) for f, md5 in resources)


def _cifar_spec(cls: type[CIFAR10]) -> TvSpec:
    pickles = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    return TvSpec((RemoteFile(cls.filename, cls.tgz_md5, (cls.url,)),),
                  partial(_read_cifar, base=cls.base_folder, train=cls.train_list, test=cls.test_list, meta=cls.meta),
                  tuple((f"{cls.base_folder}/{name}", md5) for name, md5 in pickles))


SPECS: dict[str, TvSpec] = {
    "cifar10": _cifar_spec(CIFAR10),
    "cifar100": _cifar_spec(CIFAR100),
    "mnist": TvSpec(_files(MNIST.mirrors, MNIST.resources),
                    partial(_read_mnist, classes=[str(d) for d in range(10)])),
    "fashion_mnist": TvSpec(_files(FashionMNIST.mirrors, FashionMNIST.resources),
                            partial(_read_mnist, classes=list(FashionMNIST.classes))),
}


# ---------------------------------------------------------------- download


class _BadChecksum(Exception):
    """A mirror served a file whose md5 is not the expected one."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download `url` to a temporary name beside `dest`; rename onto `dest` if its md5 matches."""
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, tmp.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=None,
                      leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        if (actual := md5sum(tmp)) != md5:
            raise _BadChecksum(f"md5 of the download is {actual}, expected {md5}")


def _reason(exc: OSError | http.client.HTTPException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _obtain(file: RemoteFile, raw_dir: Path) -> Path:
    """`raw_dir/<filename>`, verified: the file already there (downloaded or placed by hand),
    else downloaded from the first mirror that works."""
    path = raw_dir / file.filename
    if path.exists():
        if (actual := md5sum(path)) != file.md5:
            raise UserError(f"{path} is corrupt or incomplete (md5 {actual}, expected {file.md5}); "
                            "replace it with a complete copy (or delete it to download it again) and re-run")
        return path
    failures = []
    for url in file.urls:
        try:
            _fetch(url, path, file.md5)
            return path
        except _BadChecksum as exc:
            failures.append(f"{url}: {exc}")
        except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts are OSErrors
            failures.append(f"{url}: {_reason(exc)}")
    raise UserError(f"cannot download {file.filename} ({'; '.join(failures)}); with no network, place that file "
                    f"(md5 {file.md5}) in {raw_dir}/ and re-run, or use -S dataset=digits")


def _unpack(archive: Path, dest: Path) -> None:
    """A .tar.gz into `dest` (tarfile's data filter), or a .gz decompressed into `dest`."""
    try:
        if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
        else:
            assert archive.suffix == ".gz", f"no unpacker for {archive.name}"
            with gzip.open(archive, "rb") as src, (dest / archive.stem).open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except tarfile.FilterError as exc:
        raise UserError(f"{archive} has a member that would be extracted unsafely ({exc}); refused, nothing "
                        "extracted: delete it and use an authentic copy") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot extract {archive} ({exc}); delete it and re-run") from None


def _complete(folder: Path, files: tuple[RemoteFile, ...]) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == {f.filename: f.md5 for f in files}


def download(name: str, raw_dir: Path, specs: dict[str, TvSpec] = SPECS) -> Path:
    """Make data set `name` usable under `raw_dir`; return its extracted folder `raw_dir/<name>/`.
    Idempotent: a complete extraction is reused without touching the network or the archives."""
    spec = _spec(name, specs)
    folder = raw_dir / name
    if _complete(folder, spec.files):
        return folder
    raw_dir.mkdir(parents=True, exist_ok=True)
    archives = [_obtain(f, raw_dir) for f in spec.files]
    with atomic_dir(folder) as tmp:
        for archive in archives:
            _unpack(archive, tmp)
        (tmp / MARKER).write_text(json.dumps({f.filename: f.md5 for f in spec.files}))
    return folder


def load_source(name: str, raw_dir: Path, specs: dict[str, TvSpec] = SPECS) -> Source:
    """The extracted data set as a `Source` with its official train/test split."""
    spec = _spec(name, specs)
    folder = raw_dir / name
    if not (folder / MARKER).is_file():
        raise UserError(f"{folder}/ is missing or incomplete; run the download stage first (dvc repro download)")
    _verify(folder, spec.checked)
    return spec.read(name, folder)


def _spec(name: str, specs: dict[str, TvSpec]) -> TvSpec:
    if name not in specs:
        raise UserError(f"dataset={name!r} is not a torchvision data set; use one of {', '.join(specs)}")
    return specs[name]
