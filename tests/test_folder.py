"""The user's folder data set, with every kind of file real folders contain; asserts exactly
what is used, skipped (with reason) and reported, and the RGB each image mode becomes."""
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.core.images import BadImage, decode_image
from pipeline.core.params import DataParams
from pipeline.data.folder import scan, scan_folder
from pipeline.data.prepare import prepare
from pipeline.prepared import load_meta

RNG = np.random.default_rng(0)


def photo(seed: int, size=(20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def build_messy(root: Path) -> dict[str, str]:
    """Pre-split layout (train/ + valid/, no test/). Returns {relative path: expected reason ('' = used)}."""
    expected: dict[str, str] = {}

    def put(rel: str, reason: str, writer) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        expected[rel] = reason

    for k, split, n in ((0, "train", 6), (1, "valid", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):  # a distinct seed per image (str hashes differ per process and could collide)
                seed = 100 + 20 * (2 * k + c) + i
                put(f"{split}/{cls}/{i}.png", "", lambda p, s=seed: Image.fromarray(photo(s)).save(p))
    # mixed formats and modes, all usable
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = RNG.integers(0, 256, (16, 16, 3))  # noise under full transparency
    rgba[:8, :, 3] = 255
    rgba[:8, :, :3] = (10, 200, 30)
    put("train/cat/rgba.png", "", lambda p: Image.fromarray(rgba, "RGBA").save(p))
    put("train/cat/gray.jpeg", "", lambda p: Image.fromarray(photo(1)[..., 0], "L").save(p))
    pal = Image.fromarray(photo(2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("train/dog/palette.gif", "", lambda p: pal.save(p, transparency=0))
    put("train/dog/cmyk.jpg", "", lambda p: Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(p, "JPEG", quality=100))
    deep = np.full((16, 16), 65535, np.uint16)
    deep[8:] = 32768
    put("train/dog/deep16.png", "", lambda p: Image.fromarray(deep).save(p))
    put("train/dog/photo.BMP", "", lambda p: Image.fromarray(photo(3)).save(p, "BMP"))
    put("train/dog/photo.webp", "", lambda p: Image.fromarray(photo(4)).save(p, "WEBP"))
    put("train/cat/photo.tiff", "", lambda p: Image.fromarray(photo(5)).save(p, "TIFF"))
    put("valid/dog/UPPER.JPG", "", lambda p: p.write_bytes(jpeg_bytes(photo(6))))
    # files that must be skipped, each with its reason
    put("train/cat/empty.png", "empty file", lambda p: p.write_bytes(b""))
    put("train/cat/truncated.jpg", "truncated image", lambda p: p.write_bytes(jpeg_bytes(photo(7, (64, 64)))[:600]))
    put("train/dog/fake.jpg", "not an image (cannot identify)", lambda p: p.write_text("this is text"))
    put("train/.DS_Store", None, lambda p: p.write_bytes(b"\0\1\2"))  # not in a class folder: ignored
    put("train/dog/.DS_Store", "hidden file", lambda p: p.write_bytes(b"\0\1\2"))
    put("train/dog/._photo.jpg", "hidden file", lambda p: p.write_bytes(b"\0\5\6"))
    put("train/cat/notes.txt", "not an image extension", lambda p: p.write_text("labels checked"))
    put("train/cat/dup.png", "duplicate of train/cat/0.png", lambda p: p.write_bytes((root / "train/cat/0.png").read_bytes()))
    twin = jpeg_bytes(photo(8))
    put("train/cat/twin.jpg", "conflicting labels: cat, dog", lambda p: p.write_bytes(twin))
    put("train/dog/twin.jpg", "conflicting labels: cat, dog", lambda p: p.write_bytes(twin))
    (root / "train" / "bird").mkdir()  # an empty class folder
    del expected["train/.DS_Store"]
    return expected


def test_messy_folder_used_skipped_and_reported(tmp_path: Path):
    root = tmp_path / "images"
    expected = build_messy(root)
    source = scan_folder(root)
    assert source.classes == ["cat", "dog"]  # the empty 'bird' folder is not a class
    assert source.notes["layout"] == "pre-split" and source.notes["empty_class_folders"] == ["train/bird"]
    meta = prepare(source, 16, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), tmp_path / "prepared")
    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv", keep_default_na=False)
    got = {r.path: (r.reason if r.status == "skipped" else "") for r in manifest.itertuples()}
    assert got == expected
    used = manifest[manifest.status == "used"]
    assert set(used.split) == {"train", "val", "test"}  # valid/ kept as val, test carved out of train
    assert (used[used.path.str.startswith("valid/")].split == "val").all()
    assert len(used[used.split == "val"]) == 5 and meta["counts"]["val"] == 5
    assert used.hash.str.len().eq(64).all()


def test_modes_become_the_right_rgb(tmp_path: Path):
    root = tmp_path / "images"
    build_messy(root)
    rgba = np.asarray(decode_image(root / "train/cat/rgba.png", 16))
    assert (rgba[:8] == (10, 200, 30)).all() and (rgba[8:] == 255).all()  # transparent → white, not noise
    deep = np.asarray(decode_image(root / "train/dog/deep16.png", 16))
    assert (deep[:8] == 255).all() and (deep[8:] == 128).all()  # 16-bit scaled, not clipped
    cyan = np.asarray(decode_image(root / "train/dog/cmyk.jpg", 16)).reshape(-1, 3).mean(0)
    assert cyan[0] < 40 and cyan[1] > 215 and cyan[2] > 215
    gray = np.asarray(decode_image(root / "train/cat/gray.jpeg", 16))
    assert gray.shape == (20, 24, 3) and (gray[..., 0] == gray[..., 1]).all()
    for name in ("train/dog/palette.gif", "train/dog/photo.webp", "train/cat/photo.tiff", "valid/dog/UPPER.JPG"):
        img = decode_image(root / name, 16)
        assert img.mode == "RGB" and img.size == (24, 20), name
    for name, reason in (("train/cat/truncated.jpg", "truncated image"),
                         ("train/dog/fake.jpg", "not an image (cannot identify)")):
        with pytest.raises(BadImage, match=re.escape(reason)):
            decode_image(root / name, 16)


def test_class_folder_layout_is_split_stratified(tmp_path: Path):
    for cls in ("a", "b", "c"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(photo(100 * "abc".index(cls) + i, (9, 9))).save(tmp_path / "imgs" / cls / f"{i}.png")
    source = scan_folder(tmp_path / "imgs")
    assert source.splits is None and source.notes["layout"] == "class folders"
    meta = prepare(source, 8, DataParams(val_fraction=0.2, test_fraction=0.2, split_seed=0), tmp_path / "prepared")
    assert meta["counts"] == {"train": 18, "val": 6, "test": 6}
    assert load_meta(tmp_path / "prepared")["classes"] == ["a", "b", "c"]


def test_a_class_with_no_usable_image_is_an_error(tmp_path: Path):
    for cls in ("good", "bad"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
    for i in range(8):
        Image.fromarray(photo(i, (9, 9))).save(tmp_path / "imgs" / "good" / f"{i}.png")
    (tmp_path / "imgs" / "bad" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UserError, match="class 'bad' has no usable image"):
        prepare(scan_folder(tmp_path / "imgs"), 8, DataParams(val_fraction=0.2, test_fraction=0.2, split_seed=0), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_folder_errors(tmp_path: Path):
    with pytest.raises(UserError, match="is not a folder"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(photo(0, (9, 9))).save(tmp_path / "one" / "only" / "x.png")
    with pytest.raises(UserError, match="needs at least 2 class folders"):
        scan_folder(tmp_path / "one")
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        scan_folder(tmp_path / "none")


def test_parallel_decoding_matches_in_process_decoding(tmp_path: Path, monkeypatch):
    """Large sets are decoded by forked worker processes writing into one memory-mapped file:
    the arrays, labels, splits and skip reasons are exactly those of decoding in-process."""
    from pipeline.data import prepare as data

    root = tmp_path / "images"
    build_messy(root)
    source = scan_folder(root)
    prepare(source, 16, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), tmp_path / "serial")
    monkeypatch.setattr(data, "_PARALLEL_FROM", 1)  # this small set now takes the pool path...
    monkeypatch.setattr(data, "_DECODE_CHUNK", 3)   # ...in many small tasks
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1})  # 2 workers even on 1 core
    assert data.decode_workers(len(source.items)) == 2
    prepare(source, 16, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), tmp_path / "parallel")
    for name in ("train_x.npy", "train_y.npy", "val_x.npy", "test_x.npy", "test_y.npy"):
        assert np.array_equal(np.load(tmp_path / "serial" / name), np.load(tmp_path / "parallel" / name)), name
    assert (tmp_path / "serial" / "manifest.csv").read_text() == (tmp_path / "parallel" / "manifest.csv").read_text()
    assert np.load(tmp_path / "parallel" / "train_x.npy").any()  # real pixels, not an untouched file


# ---------------------------------------------------------------- what check refuses before any output is touched


def class_folders(root: Path, layout: str, files: dict[str, list[str]]) -> Path:
    """`files` ({class: file names}) as root/<class>/... or as root/train/<class>/... with
    one image of each class also in root/val/<class>/ (an empty list: an empty class folder)."""
    for split in ("train", "val") if layout == "pre-split" else ("",):
        for cls, names in files.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names if split != "val" else names[:1]):
                Image.fromarray(photo(i, (9, 9))).save(folder / name) if name.endswith(".png") else \
                    (folder / name).write_text("notes")
    root.mkdir(parents=True, exist_ok=True)
    return root


REFUSED = {
    "empty": ({}, "has no class folders"),
    "one class": ({"cat": ["0.png", "1.png"], "dog": []}, "has 1 class folder(s) with files (cat)"),
    "a class with no image": ({"cat": ["0.png"], "dog": ["notes.txt", ".0.png"]},
                              "class folder {dog} has no image (only: hidden file, not an image extension)"),
}


@pytest.mark.parametrize("layout", ["class folders", "pre-split"])
@pytest.mark.parametrize("case", REFUSED)
def test_scan_refuses_what_prepare_would_refuse(tmp_path: Path, layout: str, case: str):
    files, words = REFUSED[case]
    root = class_folders(tmp_path / "images", layout, files)
    dog = "dog" if layout == "class folders" else "train/dog, val/dog"
    with pytest.raises(UserError) as err:
        scan(root)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data_dir={str(root)!r}") and words.format(dog=dog) in message
    assert "it needs at least 2 class folders, each with at least one image (.bmp, .gif, .jpeg, .jpg, .png" in message
    with pytest.raises(UserError) as again:  # prepare refuses it the same way
        scan_folder(root)
    assert str(again.value) == message


@pytest.mark.slow
def test_check_refuses_a_bad_folder_before_dvc_touches_data_prepared(project: Path, tmp_path: Path):
    """Under the real dvc: prepare's outputs are removed before its command runs, so the check
    stage (run before prepare when data_dir or what it holds changes) is where a bad folder must
    stop: a new folder, and the same folder once a class lost its images."""
    import hashlib

    from tests.conftest import run, set_params

    def digest() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (project / "data/prepared").rglob("*")
                if p.is_file()}

    (project / "data/prepared").mkdir(parents=True)
    (project / "data/prepared/train_x.npy").write_bytes(b"a previous run's arrays")  # dvc removes it before prepare
    before = digest()
    bad = class_folders(tmp_path / "images", "pre-split", {"cat": ["0.png"], "dog": ["notes.txt"]})
    set_params(project, dataset="folder", data_dir=str(bad))
    proc = run(["dvc", "repro", "prepare"], project, check=False)
    assert digest() == before
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert "class folder train/dog, val/dog has no image" in errors[0]

    for k, cls in enumerate(("cat", "dog")):  # mended: prepare makes its arrays
        for split, n in (("train", 12), ("val", 4)):
            for i in range(n):
                Image.fromarray(photo(100 * k + 20 * (split == "val") + i, (9, 9))).save(bad / split / cls / f"{i}.png")
    run(["dvc", "repro", "prepare"], project)
    before = digest()
    for f in [*(bad / "train" / "dog").iterdir(), *(bad / "val" / "dog").iterdir()]:  # same data_dir, no dog now
        f.unlink()
    (bad / "train" / "dog" / "notes.txt").write_text("moved elsewhere")
    proc = run(["dvc", "repro", "prepare"], project, check=False)
    assert digest() == before and proc.returncode != 0, proc.stdout[-2000:]
    assert "class folder train/dog has no image" in proc.stderr


def test_scan_counts_images_by_listing_alone(tmp_path: Path):
    root = class_folders(tmp_path / "images", "pre-split", {"cat": ["0.png", "1.png", "x.txt"], "dog": ["0.png"],
                                                           "bird": []})
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    (root / "train" / "dog" / "fake.jpg").write_text("no image, but only decoding can tell")
    assert scan(root) == {"cat": 3, "dog": 3}  # the empty class folder 'bird' is no class, as in prepare


def test_scan_of_5000_files_is_fast(tmp_path: Path):
    import time

    png = jpeg_bytes(photo(0, (4, 4)))
    for cls in ("a", "b", "c", "d", "e"):
        (tmp_path / cls).mkdir()
        for i in range(1000):
            (tmp_path / cls / f"{i}.jpg").write_bytes(png)
    start = time.perf_counter()
    assert scan(tmp_path) == dict.fromkeys("abcde", 1000)
    assert time.perf_counter() - start < 1.0  # measured: ~30 ms; decoding them would take seconds


@pytest.mark.parametrize("target", ["images", "images/cat", "."], ids=["data_dir", "class folder", "above"])
def test_a_link_back_to_an_ancestor_is_named_as_a_loop(tmp_path: Path, monkeypatch, target: str):
    monkeypatch.chdir(tmp_path)
    class_folders(Path("images"), "class folders", {"cat": ["0.png"], "dog": ["0.png"]})
    Path("images/cat/sub").mkdir()
    Path("images/cat/sub/back").symlink_to(tmp_path / target)
    expected = f"images/cat/sub/back is a link back to {target}: a loop; remove it"
    for listing in (scan, scan_folder):
        with pytest.raises(UserError) as err:
            listing(Path("images"))
        assert str(err.value) == expected


def test_a_class_folder_that_is_a_link_to_data_dir_is_a_loop(tmp_path: Path):
    class_folders(tmp_path / "images", "class folders", {"cat": ["0.png"], "dog": ["0.png"]})
    (tmp_path / "images" / "all").symlink_to(tmp_path / "images")
    with pytest.raises(UserError, match=f"^{tmp_path}/images/all is a link back to {tmp_path}/images: a loop"):
        scan(tmp_path / "images")


def test_an_image_above_the_pixel_limit_is_refused_by_prepare_and_predict_alike(tmp_path: Path):
    """10,000×10,000 = 100 M pixels: above Pillow's limit (89,478,485) but under twice it, where
    Pillow itself only warns. Prepare skips and reports it as it does a corrupt image; predict
    refuses it with the same reason."""
    from pipeline.export.predict import preprocess
    from pipeline.core.preprocess import Preprocessing

    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(photo(10 * k + i, (9, 9))).save(tmp_path / "imgs" / cls / f"{i}.png")
    big = tmp_path / "imgs" / "cat" / "big.png"
    Image.new("1", (10_000, 10_000)).save(big)  # one colour: a 12 KB file
    prepare(scan_folder(tmp_path / "imgs"), 8, DataParams(val_fraction=0.2, test_fraction=0.2, split_seed=0), tmp_path / "prepared")
    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv", keep_default_na=False).set_index("path")
    reason = "decompression bomb (more pixels than the limit, 89,478,485); resize it to fewer pixels"
    assert (manifest.loc["cat/big.png", "status"], manifest.loc["cat/big.png", "reason"]) == ("skipped", reason)
    with pytest.raises(BadImage) as err:
        preprocess(big, Preprocessing(8, 8))
    assert str(err.value) == reason


def test_decode_workers_end_quietly_under_the_stages_sigterm_handler(tmp_path: Path, monkeypatch, capfd):
    """The stages turn SIGTERM into an unwinding KeyboardInterrupt (`run_cli`); the decode
    workers, forked from the stage, must not inherit that: the pool ends them with SIGTERM, and
    each printed a KeyboardInterrupt traceback at the end of every large prepare."""
    import signal

    from pipeline.data import prepare as data
    from pipeline.core.errors import _terminate

    root = tmp_path / "images"
    build_messy(root)
    monkeypatch.setattr(data, "_PARALLEL_FROM", 1)
    monkeypatch.setattr(data, "_DECODE_CHUNK", 3)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1})
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for run_ in range(3):
            prepare(scan_folder(root), 16, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0),
                    tmp_path / f"out{run_}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
