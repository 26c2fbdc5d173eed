"""Duplicates and leakage: planted copies (exact, resized, re-encoded, cropped, colour-shifted)
are found across splits and no two distinct images are paired; groups (duplicates and
data.group_by) stay whole in the split and the folds; a data set that came split reports,
drops or refuses what leaks; the data card says it all."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from pipeline.core.errors import UserError
from pipeline.core.params import DataParams
from pipeline.data import duplicates
from pipeline.data.card import data_card, duplicates_figure, leakage_line, to_markdown
from pipeline.data.folder import scan_folder
from pipeline.data.groups import fold_assignments, group_split, path_groups
from pipeline.data.prepare import prepare

COPIES = {  # how each planted copy is made from its original (64×64 RGB)
    "exact": lambda im: im,                                                   # the same pixels, saved as BMP
    "resized": lambda im: im.resize((128, 128), Image.BICUBIC),
    "reencoded": lambda im: im,                                               # saved as JPEG, quality 40
    "cropped": lambda im: im.crop((2, 2, 62, 62)),                            # 3 % off each side
    "colour": lambda im: ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.15)).enhance(1.3),
}
FORMAT = {"exact": ("bmp", {}), "reencoded": ("jpg", {"quality": 40})}


def photo(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A distinct photo-like image: a smooth random colour field with a random bright box."""
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    x = np.asarray(field).copy()
    r, c, h, w = rng.integers(0, size // 2, 4)
    x[r:r + h + 8, c:c + w + 8] = rng.integers(0, 256, 3)
    return Image.fromarray(x)


def planted_folder(root: Path, layout: str, n: int = 30, seed: int = 0) -> dict[str, str]:
    """n distinct images of 2 classes; the first 5 get one copy each (one of every kind).
    layout 'presplit': originals in train/, copies in test/ (and 10 more distinct test images);
    'unsplit': all in class folders. Returns copy path → original path."""
    rng = np.random.default_rng(seed)
    planted = {}
    for i in range(n + 10):
        cls = "ab"[i % 2]
        im = photo(rng)
        where = ("test" if i >= n else "train") if layout == "presplit" else ""
        orig = Path(where, cls, f"img{i:03d}.png")
        (root / orig).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / orig)
        if i < len(COPIES):
            kind = list(COPIES)[i]
            ext, options = FORMAT.get(kind, ("png", {}))
            copy = Path("test" if layout == "presplit" else "", cls, f"copy_{kind}.{ext}")
            (root / copy).parent.mkdir(parents=True, exist_ok=True)
            COPIES[kind](im).convert("RGB").save(root / copy, **options)
            planted[copy.as_posix()] = orig.as_posix()
    return planted


def pairs_of(out: Path) -> set[frozenset]:
    table = pd.read_csv(out / "duplicates.csv")
    return {frozenset(p) for p in zip(table["path_a"], table["path_b"])}


@pytest.mark.parametrize("layout", ["presplit", "unsplit"])
def test_every_planted_copy_is_found_and_no_distinct_images_are_paired(tmp_path: Path, layout: str):
    planted = planted_folder(tmp_path / "imgs", layout)
    meta = prepare(scan_folder(tmp_path / "imgs"), 32, DataParams(val_fraction=0.2, test_fraction=0.2), tmp_path / "out")
    assert pairs_of(tmp_path / "out") == {frozenset(p) for p in planted.items()}
    kinds = pd.read_csv(tmp_path / "out/duplicates.csv").set_index("path_b")["kind"].to_dict()
    kinds |= pd.read_csv(tmp_path / "out/duplicates.csv").set_index("path_a")["kind"].to_dict()
    assert kinds["test/a/copy_exact.bmp" if layout == "presplit" else "a/copy_exact.bmp"] == "exact"
    manifest = pd.read_csv(tmp_path / "out/manifest.csv", keep_default_na=False).set_index("path")
    if layout == "presplit":  # the splits are the maker's: every copy in test is leakage, reported
        assert meta["leaked"] == {"val": 0, "test": 5}
        from pipeline.prepared import leaked_test
        assert leaked_test(tmp_path / "out").sum() == 5
    else:  # prepare split it: each pair in one split, nothing leaks
        assert all(manifest.loc[c, "split"] == manifest.loc[o, "split"] for c, o in planted.items())
        assert meta["leaked"] == {"val": 0, "test": 0}


def test_leakage_drop_from_test_and_error(tmp_path: Path):
    planted_folder(tmp_path / "imgs", "presplit")
    source = scan_folder(tmp_path / "imgs")
    meta = prepare(source, 32, DataParams(leakage="drop_from_test"), tmp_path / "dropped")
    assert meta["counts"]["test"] == 10 and meta["leaked"]["test"] == 0
    manifest = pd.read_csv(tmp_path / "dropped/manifest.csv", keep_default_na=False)
    dropped = manifest[manifest["reason"].str.contains("dropped from test")]
    assert sorted(dropped["path"]) == sorted(p for p in manifest["path"] if "copy_" in p)
    pairs = pd.read_csv(tmp_path / "dropped/duplicates.csv", keep_default_na=False)
    assert len(pairs) == 5  # still listed; the picture shows the pairs it still holds: none
    assert not duplicates_figure(pairs, manifest, tmp_path / "dropped", tmp_path / "dup.png", 0.9)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept/mark").write_text("old")
    with pytest.raises(UserError, match=r"5 val/test images have a near-duplicate .*data.leakage"):
        prepare(source, 32, DataParams(leakage="error"), tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mark"]  # nothing touched


def test_group_by_keeps_each_group_in_one_split_and_stratifies(tmp_path: Path):
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        for patient in range(20 if cls == "a" else 10):
            for n in range(3):
                path = tmp_path / "imgs" / cls / f"{cls}{patient:02d}_{n}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                photo(rng).save(path)
    meta = prepare(scan_folder(tmp_path / "imgs"), 16, DataParams(group_by=r"([^/_]+)_[^/]*$"), tmp_path / "out")
    manifest = pd.read_csv(tmp_path / "out/manifest.csv", keep_default_na=False)
    manifest["patient"] = manifest["path"].str.extract(r"([^/_]+)_")[0]
    assert manifest.groupby("patient")["split"].nunique().max() == 1
    per = manifest.groupby(["class", "split"]).size().unstack()
    for split, frac in (("val", 0.15), ("test", 0.15)):  # each class near its share (a group is 3 images)
        assert (abs(per[split] - frac * per.sum(axis=1)) <= 3).all(), per
    assert sum(meta["counts"].values()) == 90


def test_group_split_meets_fractions_and_refuses_a_group_too_big():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    groups = np.arange(3000) // 2  # pairs
    out = group_split(labels, groups, {"val": 0.15, "test": 0.15}, seed=0)
    assert sorted(np.concatenate(list(out.values()))) == list(range(3000))
    for split in ("val", "test"):
        assert abs(len(out[split]) / 3000 - 0.15) < 0.005
        assert len(set(groups[out[split]]) & set(groups[out["train"]])) == 0
    assert group_split(labels, groups, {"val": 0.15}, seed=0)["val"].tolist() != out["val"].tolist()
    labels = np.array([0] * 10 + [1] * 10)
    with pytest.raises(UserError, match="class 1 would have no .* image .*data.duplicate_threshold"):
        group_split(labels, np.array(list(range(10)) + [10] * 10), {"test": 0.2}, seed=0)


def test_folds_keep_groups_whole_and_stratify():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    groups = np.arange(400) // 4
    folds = fold_assignments(y, groups, 5, seed=0)
    assert pd.Series(folds).groupby(groups).nunique().max() == 1
    assert all(abs((y[folds == f] == 1).mean() - (y == 1).mean()) < 0.1 for f in range(5))
    plain = fold_assignments(y, np.arange(400), 5, seed=0)  # no group joins two images: StratifiedKFold, as before
    from sklearn.model_selection import StratifiedKFold
    expected = np.empty(400, int)
    for f, (_, held) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(y, y)):
        expected[held] = f
    assert plain.tolist() == expected.tolist()


def test_path_groups_and_bad_patterns():
    names = ["a/p1_0.png", "a/p1_1.png", "b/p2_0.png", "b/other.png"]
    assert path_groups(names, r"([^/_]+)_[^/]*$").tolist() == [0, 0, 1, -1]
    assert path_groups(names, None).tolist() == [-1] * 4
    with pytest.raises(UserError, match="matches no image path"):
        path_groups(names, r"^zzz")
    with pytest.raises(Exception, match="not a regular expression"):
        DataParams(group_by="([")


def test_blocks_and_bursts_give_the_same_groups(monkeypatch):
    rng = np.random.default_rng(0)
    base = np.stack([np.asarray(photo(rng, 16)) for _ in range(60)])
    burst = np.clip(base[:1].astype(int) + rng.integers(-3, 4, (50, 16, 16, 3)), 0, 255).astype(np.uint8)
    thumbs = np.concatenate([base, burst])
    pairs, sim = duplicates.near_pairs(thumbs, 0.9)
    groups = duplicates.components(len(thumbs), pairs)
    assert len(set(groups[60:]) | {groups[0]}) == 1          # the burst and its original: one group
    assert len(set(groups[1:60])) == 59 and groups[0] not in groups[1:60]  # the other 59 alone
    monkeypatch.setattr(duplicates, "_BLOCK_BYTES", 4 * len(thumbs) * 7)  # 7 rows a block
    monkeypatch.setattr(duplicates, "MAX_PER_IMAGE", 4)
    small = duplicates.components(len(thumbs), duplicates.near_pairs(thumbs, 0.9)[0])
    assert small.tolist() == groups.tolist()
    assert (sim >= 0.9).all()


def test_card_json_markdown_and_picture(tmp_path: Path):
    planted_folder(tmp_path / "imgs", "presplit")
    data = DataParams()
    meta = prepare(scan_folder(tmp_path / "imgs"), 32, data, tmp_path / "out")
    manifest = pd.read_csv(tmp_path / "out/manifest.csv", keep_default_na=False, dtype=str)
    pairs = pd.read_csv(tmp_path / "out/duplicates.csv", keep_default_na=False, dtype={"similarity": float})
    about = {"name": "imgs", "source": "folder", "path": "imgs", "hash": meta["content_hash"]}
    card = data_card(manifest, meta["classes"], {}, about, pairs, meta, data)
    json.dumps(card)
    assert card["images"]["modes"] == {"RGB": 45} and card["images"]["most_common_sizes"] == {"64×64": 43, "128×128": 1, "60×60": 1}
    assert card["images"]["width"]["max"] == 128
    dup = card["duplicates"]
    assert (dup["pairs"], dup["exact_pairs"], dup["groups"], dup["largest_group"]) == (5, 1, 5, 2)
    assert sum(dup["pairs_by_splits"].values()) == 5 and set(dup["pairs_by_splits"]) <= {"train-test", "val-test"}
    assert dup["leaked"] == {"val": 0, "test": 5}
    assert leakage_line(card).startswith("LEAKAGE: 5 test images")
    md = to_markdown(card, manifest)
    assert "# Data card: imgs" in md and "## Duplicates and leakage" in md and "## Image sizes and modes" in md
    assert "LEAKAGE" in md and "data_card_duplicates.png" in md and meta["content_hash"][:16] in md
    assert duplicates_figure(pairs, manifest, tmp_path / "out", tmp_path / "dup.png", 0.9)
    assert Image.open(tmp_path / "dup.png").size[0] > 300
    # the same images, relabelled by nothing and re-split by another seed: the same content hash
    again = prepare(scan_folder(tmp_path / "imgs"), 16, DataParams(split_seed=3), tmp_path / "again")
    assert again["content_hash"] == meta["content_hash"]


def test_check_refuses_a_group_by_that_matches_no_path(tmp_path: Path):
    from pipeline.check import check_files
    from pipeline.core.params import parse_params

    planted_folder(tmp_path / "imgs", "unsplit", n=6)
    raw = {"dataset": "folder", "data_dir": str(tmp_path / "imgs"), "data": {"group_by": "^zzz"}}
    with pytest.raises(UserError, match=r"data.group_by='\^zzz' matches no image path"):
        check_files(parse_params(raw, check_models=False))
    check_files(parse_params(raw | {"data": {"group_by": "img0"}}, check_models=False))  # one match is enough


def test_clean_metrics_split_the_test_score_by_leakage():
    from pipeline.evaluation.run import clean_metrics

    y = np.array([0, 1, 0, 1, 0])
    pred = np.array([0, 1, 1, 0, 0])
    leaked = np.array([True, True, False, False, False])
    assert clean_metrics(y, pred, leaked) == {"accuracy_clean": 1 / 3, "accuracy_leaked": 1.0,
                                              "test_images_clean": 3, "test_images_leaked": 2}
    assert clean_metrics(y, pred, np.zeros(5, bool)) == {}
