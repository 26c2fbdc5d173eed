"""The torchvision sets on tiny archives in their real formats, served over HTTP from 127.0.0.1:
download → md5 → extraction → load_source → prepare; offline use of a placed file; corrupt
files; hostile archives; a second download that needs no network."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import struct
import tarfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.core.images import resize
from pipeline.core.params import DataParams
from pipeline.data import tvsets
from pipeline.data.prepare import prepare
from pipeline.prepared import load_split

CIFAR10 = "cifar-10-python.tar.gz"
CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


# ---------------------------------------------------------------- tiny files in the real formats


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as cPickle did when the CIFAR
    files were made: loaded with encoding='latin1' the keys are str, with 'bytes' they are bytes."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The real files were written with numpy 1.x, whose arrays name numpy.core (numpy 2: numpy._core).
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar10_tar(path: Path, rng: np.random.Generator, per_batch: int = 20, extra=()) -> dict:
    """cifar-10-python.tar.gz with the real layout: 5 train batches, test_batch, batches.meta.
    Every batch holds each class twice. Returns the images (N×32×32×3) and labels written."""
    written = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    with tarfile.open(path, "w:gz") as tar:
        for batch in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            labels = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
            hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            data = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # rows: R plane, G plane, B plane
            add_bytes(tar, f"cifar-10-batches-py/{batch}", py2_pickle(
                {b"batch_label": batch.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}))
            split = "test" if batch == "test_batch" else "train"
            written[f"{split}_x"].append(hwc)
            written[f"{split}_y"] += labels
        add_bytes(tar, "cifar-10-batches-py/batches.meta", py2_pickle(
            {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_NAMES, b"num_vis": 3072}))
        add_bytes(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
        for member in extra:
            tar.addfile(member, io.BytesIO(b"evil") if member.isfile() else None)
    return {k: np.concatenate(v) if k.endswith("_x") else np.array(v) for k, v in written.items()}


def cifar100_tar(path: Path, rng: np.random.Generator) -> dict:
    written = {}
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", 12), ("test", 6)):
            fine = [int(v) for v in np.arange(n) % 3]
            hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            add_bytes(tar, f"cifar-100-python/{split}", py2_pickle(
                {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                 b"coarse_labels": [0] * n, b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072)}))
            written[split] = (hwc, fine)
        add_bytes(tar, "cifar-100-python/meta", py2_pickle(
            {b"fine_label_names": [b"apple", b"aquarium_fish", b"baby"], b"coarse_label_names": [b"fruit"]}))
    return written


def idx_gz(path: Path, array: np.ndarray) -> None:
    """An IDX file, gzipped: magic 0x0000 08 <ndim>, big-endian uint32 sizes, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def mnist_files(folder: Path, rng: np.random.Generator) -> tuple[dict, dict]:
    """The four MNIST/Fashion-MNIST files: 30 train and 10 test 28×28 images and their labels."""
    images = {p: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in (("train", 30), ("t10k", 10))}
    labels = {p: np.arange(len(images[p])) % 10 for p in images}
    for p in images:
        idx_gz(folder / f"{p}-images-idx3-ubyte.gz", images[p])
        idx_gz(folder / f"{p}-labels-idx1-ubyte.gz", labels[p])
    return images, labels


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def spec_for(name: str, folder: Path, base_url: str) -> dict[str, tvsets.TvSpec]:
    """SPECS with `name`'s files pointed at `base_url` and their md5s those of `folder`'s files
    (the pickles read from a tiny archive: the md5s of its members)."""
    real = tvsets.SPECS[name]
    files = tuple(dataclasses.replace(f, md5=md5(folder / f.filename) if (folder / f.filename).exists() else f.md5,
                                      urls=(base_url + f.filename,)) for f in real.files)
    return {name: dataclasses.replace(real, files=files, checked=member_md5s(folder / real.files[0].filename, real))}


def member_md5s(archive: Path, spec: tvsets.TvSpec) -> tuple[tuple[str, str], ...]:
    if not spec.checked or not archive.exists():
        return spec.checked
    with tarfile.open(archive) as tar:
        return tuple((rel, hashlib.md5(tar.extractfile(rel).read()).hexdigest()) for rel, _ in spec.checked)


# ---------------------------------------------------------------- fixtures


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class Server:
    """http.server on 127.0.0.1, a free port, serving `folder` from a thread."""

    def __init__(self, folder: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    folder = tmp_path / "www"
    folder.mkdir()
    server = Server(folder)
    yield folder, server
    server.stop()


@pytest.fixture
def offline_url() -> str:
    """A URL on a port nothing listens on: connections are refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ---------------------------------------------------------------- tests


def test_specs_come_from_torchvision():
    assert set(tvsets.SPECS) == {"cifar10", "cifar100", "mnist", "fashion_mnist"}
    (cifar,) = tvsets.SPECS["cifar10"].files
    assert (cifar.filename, cifar.md5) == (CIFAR10, "c58f30108f718f92721af3b95e74349a")
    assert cifar.urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
    mnist = tvsets.SPECS["mnist"].files
    assert [f.filename for f in mnist][0] == "train-images-idx3-ubyte.gz" and len(mnist) == 4
    assert len(mnist[0].urls) >= 2 and all(u.endswith("/train-images-idx3-ubyte.gz") for u in mnist[0].urls)
    assert tvsets.SPECS["fashion_mnist"].files[0].md5 == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"


def test_cifar10_download_extract_load_prepare(tmp_path: Path, served):
    www, server = served
    written = cifar10_tar(www / CIFAR10, np.random.default_rng(0))
    raw = tmp_path / "raw"
    specs = spec_for("cifar10", www, server.url)
    folder = tvsets.download("cifar10", raw, specs=specs)
    assert folder == raw / "cifar10" and (folder / "cifar-10-batches-py" / "test_batch").is_file()
    assert md5(raw / CIFAR10) == md5(www / CIFAR10)
    assert sorted(p.name for p in raw.iterdir()) == [CIFAR10, "cifar10"]  # no temporary files

    source = tvsets.load_source("cifar10", raw, specs=specs)
    assert source.classes == [c.decode() for c in CIFAR10_NAMES]
    all_x = np.concatenate([written["train_x"], written["test_x"]])
    assert list(source.labels) == list(written["train_y"]) + list(written["test_y"])
    assert list(source.splits) == ["train"] * 100 + ["test"] * 20
    assert source.names[42] == "cifar10/train/00042" and source.names[100] == "cifar10/test/00000"
    for i in source.items:
        image = source.decode(i, 16)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, all_x[i])

    meta = prepare(source, 16, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), tmp_path / "prepared")
    assert meta["counts"]["test"] == 20 and meta["counts"]["train"] > 0 and meta["counts"]["val"] > 0
    assert meta["counts"]["train"] + meta["counts"]["val"] == 100
    test_x, test_y = load_split("test", tmp_path / "prepared")
    np.testing.assert_array_equal(test_y, written["test_y"])
    np.testing.assert_array_equal(test_x, np.stack([resize(x, 16).transpose(2, 0, 1) for x in written["test_x"]]))


def test_cifar100_fine_labels_and_names(tmp_path: Path, served):
    www, server = served
    written = cifar100_tar(www / "cifar-100-python.tar.gz", np.random.default_rng(1))
    specs = spec_for("cifar100", www, server.url)
    tvsets.download("cifar100", tmp_path / "raw", specs=specs)
    source = tvsets.load_source("cifar100", tmp_path / "raw", specs=specs)
    assert source.classes == ["apple", "aquarium_fish", "baby"]
    assert list(source.labels) == written["train"][1] + written["test"][1]
    assert list(source.splits) == ["train"] * 12 + ["test"] * 6
    np.testing.assert_array_equal(source.decode(13, 32), written["test"][0][1])


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_grayscale_sets_decode_to_three_equal_channels(tmp_path: Path, served, name: str):
    www, server = served
    images, labels = mnist_files(www, np.random.default_rng(2))
    tvsets.download(name, tmp_path / "raw", specs=spec_for(name, www, server.url))
    source = tvsets.load_source(name, tmp_path / "raw")
    assert source.classes == ([str(d) for d in range(10)] if name == "mnist" else
                              ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                               "Sneaker", "Bag", "Ankle boot"])
    assert list(source.splits) == ["train"] * 30 + ["test"] * 10
    np.testing.assert_array_equal(source.labels, np.concatenate([labels["train"], labels["t10k"]]))
    for i, expected in ((0, images["train"][0]), (35, images["t10k"][5])):
        image = source.decode(i, 28)  # grey, as stored: prepare repeats it into three channels
        assert image.shape == (28, 28) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, expected)


def test_mirrors_are_tried_in_order(tmp_path: Path, served, offline_url: str):
    www, server = served
    mnist_files(www, np.random.default_rng(3))
    spec = spec_for("mnist", www, server.url)["mnist"]
    mirrors = (offline_url, server.url + "missing/", server.url)  # refused, 404, works
    files = tuple(dataclasses.replace(f, urls=tuple(m + f.filename for m in mirrors)) for f in spec.files)
    tvsets.download("mnist", tmp_path / "raw", specs={"mnist": dataclasses.replace(spec, files=files)})
    assert len(tvsets.load_source("mnist", tmp_path / "raw").items) == 40

    files = tuple(dataclasses.replace(f, urls=f.urls[:2]) for f in files)
    with pytest.raises(UserError) as err:
        tvsets.download("mnist", tmp_path / "raw2", specs={"mnist": dataclasses.replace(spec, files=files)})
    message = str(err.value)
    assert "refused" in message and "HTTP 404" in message and "train-images-idx3-ubyte.gz" in message


def test_offline_with_placed_archive(tmp_path: Path, offline_url: str):
    raw = tmp_path / "raw"
    raw.mkdir()
    written = cifar10_tar(raw / CIFAR10, np.random.default_rng(3))
    specs = spec_for("cifar10", raw, offline_url)
    tvsets.download("cifar10", raw, specs=specs)
    source = tvsets.load_source("cifar10", raw, specs=specs)
    np.testing.assert_array_equal(source.decode(119, 32), written["test_x"][19])


def test_offline_with_nothing_placed_names_the_file(tmp_path: Path, offline_url: str):
    specs = spec_for("cifar10", tmp_path, offline_url)  # real md5: nothing there to hash
    with pytest.raises(UserError) as err:
        tvsets.download("cifar10", tmp_path / "raw", specs=specs)
    message = str(err.value)
    assert "\n" not in message and CIFAR10 in message and "dataset=digits" in message
    assert "c58f30108f718f92721af3b95e74349a" in message and str(tmp_path / "raw") in message
    assert list((tmp_path / "raw").iterdir()) == []


def test_corrupt_placed_archive_is_kept_and_not_extracted(tmp_path: Path, offline_url: str):
    raw = tmp_path / "raw"
    raw.mkdir()
    cifar10_tar(raw / CIFAR10, np.random.default_rng(4))
    specs = spec_for("cifar10", raw, offline_url)
    data = bytearray((raw / CIFAR10).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (raw / CIFAR10).write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt") as err:
        tvsets.download("cifar10", raw, specs=specs)
    assert specs["cifar10"].files[0].md5 in str(err.value) and md5(raw / CIFAR10) in str(err.value)
    assert (raw / CIFAR10).read_bytes() == bytes(data)  # the user's file is not deleted
    assert [p.name for p in raw.iterdir()] == [CIFAR10]  # nothing extracted


def test_corrupt_download_leaves_nothing(tmp_path: Path, served):
    www, server = served
    cifar10_tar(www / CIFAR10, np.random.default_rng(5))
    specs = spec_for("cifar10", www, server.url)
    expected = specs["cifar10"].files[0].md5
    (www / CIFAR10).write_bytes((www / CIFAR10).read_bytes()[:-100])  # served bytes no longer match
    raw = tmp_path / "raw"
    with pytest.raises(UserError) as err:
        tvsets.download("cifar10", raw, specs=specs)
    assert expected in str(err.value) and md5(www / CIFAR10) in str(err.value)
    assert list(raw.iterdir()) == []  # no temporary download, no archive, no extraction


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


@pytest.mark.parametrize("member", [regular("../escape.txt"),
                                    symlink("cifar-10-batches-py/link", "../../../escape.txt"),
                                    symlink("cifar-10-batches-py/link", "/etc/passwd")],
                         ids=["dotdot", "symlink-out", "symlink-absolute"])
def test_hostile_archive_is_refused(tmp_path: Path, offline_url: str, member: tarfile.TarInfo):
    raw = tmp_path / "a" / "raw"  # "../escape.txt" from the extraction folder would land in raw/
    raw.mkdir(parents=True)
    cifar10_tar(raw / CIFAR10, np.random.default_rng(6), extra=[member])  # valid members come first
    with pytest.raises(UserError, match="cifar-10-python.tar.gz.*unsafely"):
        tvsets.download("cifar10", raw, specs=spec_for("cifar10", raw, offline_url))
    assert [p.name for p in raw.iterdir()] == [CIFAR10]  # no partial extraction, no escape.txt
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", "raw", CIFAR10])


def test_absolute_member_stays_inside(tmp_path: Path, offline_url: str):
    outside = tmp_path / "outside.txt"
    raw = tmp_path / "raw"
    raw.mkdir()
    cifar10_tar(raw / CIFAR10, np.random.default_rng(7), extra=[regular(str(outside))])
    folder = tvsets.download("cifar10", raw, specs=spec_for("cifar10", raw, offline_url))
    assert not outside.exists()
    assert (folder / str(outside).lstrip("/")).read_bytes() == b"evil"  # "/x/y" is extracted as x/y, inside


def test_second_download_needs_no_network(tmp_path: Path, served):
    www, server = served
    cifar10_tar(www / CIFAR10, np.random.default_rng(8))
    specs = spec_for("cifar10", www, server.url)
    raw = tmp_path / "raw"
    folder = tvsets.download("cifar10", raw, specs=specs)
    sentinel = folder / "sentinel"
    sentinel.write_text("kept")  # an extraction redone would replace the folder and lose it
    server.stop()
    (raw / CIFAR10).unlink()  # neither re-downloaded nor re-verified
    start = time.perf_counter()
    assert tvsets.download("cifar10", raw, specs=specs) == folder
    assert time.perf_counter() - start < 0.5
    assert sentinel.read_text() == "kept"


def test_interrupted_extraction_is_not_complete(tmp_path: Path, served):
    www, server = served
    cifar10_tar(www / CIFAR10, np.random.default_rng(9))
    specs = spec_for("cifar10", www, server.url)
    raw = tmp_path / "raw"
    folder = tvsets.download("cifar10", raw, specs=specs)
    (folder / tvsets.MARKER).unlink()  # as if the extraction had stopped before its last write
    with pytest.raises(UserError, match="download stage"):
        tvsets.load_source("cifar10", raw, specs=specs)
    server.stop()  # the archive is there: it is verified and extracted again, no network needed
    assert tvsets.download("cifar10", raw, specs=specs) == folder and (folder / tvsets.MARKER).is_file()
    assert len(tvsets.load_source("cifar10", raw, specs=specs).items) == 120


def test_load_source_before_download(tmp_path: Path):
    with pytest.raises(UserError, match="run the download stage"):
        tvsets.load_source("mnist", tmp_path)


def test_truncated_extracted_file_is_a_user_error(tmp_path: Path, served):
    www, server = served
    mnist_files(www, np.random.default_rng(10))
    folder = tvsets.download("mnist", tmp_path / "raw", specs=spec_for("mnist", www, server.url))
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte is truncated"):
        tvsets.load_source("mnist", tmp_path / "raw")


# ---------------------------------------------------------------- planted pickles


class Payload:
    """Pickles as a call of os.system: what a planted batch file would run when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def planted_folder(raw: Path, ran: Path) -> Path:
    """raw/cifar10/ as someone could leave it: a marker written by hand, and batch files whose
    unpickling would create `ran`. Returns the batches' folder."""
    batches = raw / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (raw / "cifar10" / tvsets.MARKER).write_text(json.dumps({CIFAR10: tvsets.SPECS["cifar10"].files[0].md5}))
    batch = {b"batch_label": b"x", b"labels": [0], b"data": Payload(f"touch {ran}"), b"filenames": [b"a.png"]}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(py2_pickle(batch))
    (batches / "batches.meta").write_bytes(py2_pickle({b"label_names": CIFAR10_NAMES}))
    return batches


def test_a_planted_batch_beside_a_handwritten_marker_is_refused_unread(tmp_path: Path):
    ran = tmp_path / "payload-ran"
    batches = planted_folder(tmp_path / "raw", ran)
    with pytest.raises(UserError) as err:
        tvsets.load_source("cifar10", tmp_path / "raw")
    assert not ran.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{batches / 'data_batch_1'} is not the file the archive holds")
    assert "expected c99cafc152244af753f735de768cd75f" in message  # torchvision's md5 of the real file
    assert f"delete {tmp_path / 'raw' / 'cifar10'}/ and re-run the download stage" in message


def test_the_unpickler_builds_arrays_and_refuses_any_other_call(tmp_path: Path):
    """Past the md5 check (a spec listing no md5s), a pickle still cannot run anything."""
    ran = tmp_path / "payload-ran"
    batches = planted_folder(tmp_path / "raw", ran)
    unchecked = {"cifar10": dataclasses.replace(tvsets.SPECS["cifar10"], checked=())}
    with pytest.raises(UserError) as err:
        tvsets.load_source("cifar10", tmp_path / "raw", specs=unchecked)
    assert not ran.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{batches / 'data_batch_1'} asks to call posix.system")
    assert "refused, nothing run" in message and f"delete {tmp_path / 'raw'}/" in message


def test_batches_pickled_by_python3_and_numpy2_are_read_too(tmp_path: Path):
    """Protocol 2 from Python 3 writes bytes as _codecs.encode calls and numpy 2 names numpy._core."""
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [3, 1], b"filenames": [b"a.png", b"b.png"],
                                   b"batch_label": b"training batch 1 of 5"}, protocol=2))
    assert b"_codecs" in path.read_bytes() and b"numpy._core" in path.read_bytes()
    batch = tvsets._unpickle(path)
    np.testing.assert_array_equal(batch["data"], data)
    assert batch["labels"] == [3, 1] and batch["filenames"] == [b"a.png", b"b.png"]
