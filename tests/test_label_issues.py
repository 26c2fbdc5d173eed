"""Label issues with real cleanlab: labels flipped on purpose in digits are the top suspects;
the out-of-fold file as cross-validation writes it; the CSV and the suspects figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.crossval.summary import oof_table
from pipeline.evaluation import label_issues as li

DIGITS = [str(d) for d in range(10)]  # class names that look like numbers: must stay strings


@pytest.fixture(scope="module")
def flipped_digits():
    """1,000 digits, 3 labels flipped on purpose, out-of-fold probabilities of a logistic
    regression (5 folds). Returns images (uint8 N×3×8×8), the original and the given labels,
    the probabilities and the flipped positions."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x, y = load_digits(return_X_y=True)
    x, y = x[:1000] / 16, y[:1000]
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), 3, replace=False)
    given = y.copy()
    given[flipped] = (y[flipped] + rng.integers(1, 10, 3)) % 10
    probs = cross_val_predict(LogisticRegression(max_iter=3000, C=10.0), x, given,
                              cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    images = np.repeat(np.round(255 * x).astype(np.uint8).reshape(-1, 1, 8, 8), 3, axis=1)
    return images, y, given, probs, flipped


def val_ids(n: int) -> pd.DataFrame:
    return pd.DataFrame({"split": "val", "index": np.arange(n)})


def test_flipped_labels_are_the_top_suspects(flipped_digits):
    _, truth, given, probs, flipped = flipped_digits
    table = li.find_label_issues(val_ids(len(given)), given, probs, DIGITS, "digits out-of-fold")
    top = table[table["rank"] <= 3]
    assert sorted(top["index"]) == sorted(flipped)
    by_index = top.set_index("index")
    for i in flipped:  # the suggestion is the digit it really is, the given label the flipped one
        assert by_index.loc[i, "suggested"] == str(truth[i]) and by_index.loc[i, "given"] == str(given[i])
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["label_quality"].is_monotonic_increasing and (table["p_given"] == table["label_quality"]).all()
    assert (table["source"] == "digits out-of-fold").all() and table.attrs["reason"] == ""


def test_same_input_same_table_csv_and_png(flipped_digits, tmp_path):
    images, _, given, probs, _ = flipped_digits
    outputs = []
    for run in ("a", "b"):
        table = li.find_label_issues(val_ids(len(given)), given, probs, DIGITS, "val")
        li.write_label_issues(table, tmp_path / f"{run}.csv", "val", len(given))
        li.suspects_figure(images[table["index"]], table, DIGITS, tmp_path / f"{run}.png")
        outputs.append(((tmp_path / f"{run}.csv").read_bytes(), (tmp_path / f"{run}.png").read_bytes()))
    assert outputs[0] == outputs[1]


def test_rows_not_summing_to_one_are_normalised(flipped_digits):
    _, _, given, probs, _ = flipped_digits
    scale = np.random.default_rng(1).uniform(0.2, 5.0, (len(probs), 1))
    plain = li.find_label_issues(val_ids(len(given)), given, probs, DIGITS, "val")
    scaled = li.find_label_issues(val_ids(len(given)), given, probs * scale, DIGITS, "val")
    pd.testing.assert_frame_equal(plain, scaled, rtol=1e-12)


def write_oof(path, classes, folds):
    """metrics/oof_predictions.csv as cross-validation writes it, from fold records holding
    (split, index, label, probs) lists."""
    records = [{"fold": f, "classes": classes, "oof": dict(zip(("split", "index", "label", "probs"), oof))}
               for f, oof in enumerate(folds)]
    oof_table(records).to_csv(path, index=False, float_format="%.6f")


def test_oof_file_gives_ids_labels_and_probabilities_in_the_classes_order(tmp_path):
    path = tmp_path / "oof_predictions.csv"
    file_classes = ["7", "cat", "3"]
    write_oof(path, file_classes, [(["val", "train"], [1, 0], [1, 0], [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]),
                                   (["train", "val"], [1, 0], [2, 2], [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])])
    ids, labels, probs = li.oof_probabilities(path, ["3", "7", "cat"])
    assert ids.to_dict("list") == {"split": ["train", "train", "val", "val"], "index": [0, 1, 0, 1]}
    assert labels.tolist() == [1, 0, 0, 2]  # 7, 3, 3, cat in the model's order 3, 7, cat
    np.testing.assert_allclose(probs, [[0.1, 0.6, 0.3], [0.6, 0.2, 0.2], [0.25, 0.5, 0.25], [0.2, 0.1, 0.7]])


def test_missing_empty_or_crossval_off_oof_file_gives_none(tmp_path):
    off = tmp_path / "off.csv"
    oof_table([]).to_csv(off, index=False)  # what summarize writes with crossval.folds: 0
    (tmp_path / "empty.csv").write_text("")
    for path in (tmp_path / "missing.csv", tmp_path / "empty.csv", off):
        assert li.oof_probabilities(path, DIGITS) is None


def test_oof_file_of_other_classes_is_a_user_error(tmp_path):
    path = tmp_path / "oof_predictions.csv"
    write_oof(path, ["cat", "dog"], [(["val"], [0], [0], [[0.9, 0.1]])])
    with pytest.raises(UserError, match="dvc repro -f train") as err:
        li.oof_probabilities(path, ["cat", "dog", "bird"])
    assert "\n" not in str(err.value)


def test_csv_says_its_source_and_reads_back_with_pandas(flipped_digits, tmp_path):
    _, _, given, probs, flipped = flipped_digits
    table = li.find_label_issues(val_ids(len(given)), given, probs, DIGITS, "out-of-fold, 5 folds")
    li.write_label_issues(table, tmp_path / "label_issues.csv", "out-of-fold, 5 folds", len(given))
    back = pd.read_csv(tmp_path / "label_issues.csv", dtype={"given": str, "suggested": str})
    assert list(back.columns) == li.COLUMNS and len(back) == len(table) >= 3
    assert (back["source"] == "out-of-fold, 5 folds").all() and (back["checked"] == len(given)).all()
    assert set(back.loc[back["rank"] <= 3, "index"]) == set(flipped)
    np.testing.assert_allclose(back["p_suggested"], table["p_suggested"], atol=5e-7)


@pytest.mark.parametrize("labels, probs, reason", [
    ([], np.zeros((0, 3)), "no images"),
    ([1, 1, 1], np.full((3, 3), 1 / 3), "same given label"),
    ([0, 1, 2], np.array([[1, 0, 0], [0, np.nan, 1], [0, 0, 1.0]]), "finite"),
    ([0, 1, 2], np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1.0]]), "sums to 0"),
])
def test_what_cleanlab_cannot_check_is_an_empty_table_with_the_reason(labels, probs, reason):
    table = li.find_label_issues(val_ids(len(labels)), np.array(labels, int), probs, ["a", "b", "c"], "val")
    assert table.empty and list(table.columns) == li.COLUMNS[:-1] and reason in table.attrs["reason"]


def test_nothing_flagged_still_writes_a_header_and_a_note(tmp_path):
    table = li.find_label_issues(val_ids(0), np.zeros(0, int), np.zeros((0, 2)), ["a", "b"], "val")
    li.write_label_issues(table, tmp_path / "label_issues.csv", "val", 0)
    assert (tmp_path / "label_issues.csv").read_text() == ",".join(li.COLUMNS) + "\n"
    back = pd.read_csv(tmp_path / "label_issues.csv")
    assert list(back.columns) == li.COLUMNS and back.empty
    li.suspects_figure(np.zeros((0, 3, 8, 8), np.uint8), table, ["a", "b"], tmp_path / "suspects.png")
    with Image.open(tmp_path / "suspects.png") as img:
        assert img.size != li.suspects_size(1)  # the note, not an empty grid


@pytest.mark.parametrize("shown", [2, 7, 24])
def test_suspects_png_has_the_stated_pixel_size(flipped_digits, tmp_path, shown):
    images, _, given, probs, _ = flipped_digits
    names = [f"a very long class name {d}" for d in DIGITS]  # titles are cut, nothing spills out
    table = li.find_label_issues(val_ids(len(given)), given, probs, names, "val")
    table = pd.concat([table] * (-(-shown // len(table))), ignore_index=True).head(shown)
    li.suspects_figure(images[table["index"]], table, names, tmp_path / "suspects.png")
    with Image.open(tmp_path / "suspects.png") as img:
        assert img.size == li.suspects_size(shown)
    assert li.suspects_size(shown)[0] == li.suspects_size(1)[0]  # always COLS wide


def test_without_cross_validation_the_checkpoints_validation_logits_are_used_as_a_pass_of_the_model(
        flipped_digits, tmp_path, monkeypatch):
    """evaluate passes the checkpoint's validation logits: the same table as scoring the split
    with the model, and no pass of the model (None here)."""
    import torch

    from pipeline.core import paths
    from pipeline.checkpoint import predict_logits
    from pipeline.evaluation import pictures
    from pipeline.models import build_model
    from pipeline.core.preprocess import Preprocessing

    images, _, given, _, _ = flipped_digits
    monkeypatch.chdir(tmp_path)
    paths.PREPARED_DIR.mkdir(parents=True)
    paths.METRICS_DIR.mkdir()
    np.save(paths.PREPARED_DIR / "val_x.npy", images)
    np.save(paths.PREPARED_DIR / "val_y.npy", given)
    torch.manual_seed(0)
    model = build_model("original", 10, width=8).eval()
    prep = Preprocessing(8, 8, mean=(0.5,) * 3, std=(0.25,) * 3)
    tables = []
    for scorer, logits in ((model, None), (None, predict_logits(model, images, prep))):
        line = pictures.label_issues(scorer, prep, DIGITS, 1.5, True, val_logits=logits)
        assert "validation split" in line
        tables.append(paths.LABEL_ISSUES.read_bytes())
    assert tables[0] == tables[1]
