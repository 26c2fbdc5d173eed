"""download + prepare on real digits: split, resize, statistics, atomic outputs."""
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.core.params import DataParams
from pipeline.data.prepare import channel_stats, prepare
from pipeline.data.registry import download, load_source
from pipeline.data.source import Source
from pipeline.prepared import load_meta, load_split


def array_source(images, labels, classes, splits=None) -> Source:
    return Source(classes, range(len(images)), np.asarray(labels), lambda i, _s: images[i], splits=splits)


def test_download_digits_is_real_and_idempotent(tmp_path: Path):
    path = download("digits", tmp_path)
    first = path.read_bytes()
    source = load_source("digits", tmp_path)
    assert len(source.items) == len(source.labels) == 1797
    assert source.classes == [str(i) for i in range(10)]
    images = [source.decode(i, 8) for i in source.items]
    assert images[0].shape == (8, 8) and images[0].dtype == np.uint8  # grey: prepare makes it RGB
    assert max(int(im.max()) for im in images) == 255
    assert download("digits", tmp_path).read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["digits.npz"]  # no temporary files left


def test_prepared_splits(prepared_digits: Path):
    meta = load_meta(prepared_digits)
    splits = {s: load_split(s, prepared_digits) for s in ("train", "val", "test")}
    assert {s: len(y) for s, (_, y) in splits.items()} == meta["counts"]
    assert sum(meta["counts"].values()) == 1797
    for x, y in splits.values():
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 16, 16) and len(x) == len(y)
    # stratified: each class's share in every split is within two images of its overall share
    # (two rounds of splitting, each rounding once)
    all_y = np.concatenate([y for _, y in splits.values()])
    for _, y in splits.values():
        for c in range(10):
            expected = (all_y == c).mean() * len(y)
            assert abs((y == c).sum() - expected) <= 2.0


def test_statistics_come_from_the_train_split_only(prepared_digits: Path):
    meta = load_meta(prepared_digits)
    x_train, _ = load_split("train", prepared_digits)
    x_test, _ = load_split("test", prepared_digits)
    train_mean = x_train.astype(np.float64).mean(axis=(0, 2, 3)) / 255
    train_std = (x_train.astype(np.float64) / 255).std(axis=(0, 2, 3))
    np.testing.assert_allclose(meta["mean"], train_mean, rtol=1e-9)
    np.testing.assert_allclose(meta["std"], train_std, rtol=1e-6)
    assert channel_stats(x_test)[0] != meta["mean"]


def test_split_is_seeded(tmp_path: Path):
    raw = load_source("digits", download("digits", tmp_path / "raw").parent)
    a = prepare(raw, 8, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=1), tmp_path / "a")
    b = prepare(raw, 8, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=1), tmp_path / "b")
    c = prepare(raw, 8, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=2), tmp_path / "c")
    ya, yb, yc = (load_split("test", tmp_path / d)[0] for d in "abc")
    assert np.array_equal(ya, yb) and not np.array_equal(ya, yc)
    assert a == b


def test_one_class_is_an_error_and_writes_nothing(tmp_path: Path):
    raw = array_source([np.zeros((8, 8, 3), np.uint8)] * 10, np.zeros(10, np.int64), ["only"])
    with pytest.raises(UserError, match="at least 2"):
        prepare(raw, 8, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_too_few_images_to_split_is_a_clear_error(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)  # distinct: no duplicate groups
    raw = array_source(list(images), np.array([0, 0, 1, 1]), ["a", "b"])
    with pytest.raises(UserError, match="cannot split"):
        prepare(raw, 8, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), tmp_path / "prepared")
    assert list(tmp_path.iterdir()) == []
