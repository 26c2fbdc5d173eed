"""The data card, from a manifest: counts per class and split, skipped by reason, imbalance."""
import pandas as pd

from pipeline.data.card import data_card, summary_line, to_markdown


def manifest() -> pd.DataFrame:
    rows = [("a/1.png", "a", "train", "used", ""), ("a/2.png", "a", "train", "used", ""),
            ("a/3.png", "a", "train", "used", ""), ("a/4.png", "a", "test", "used", ""),
            ("b/1.png", "b", "train", "used", ""), ("b/2.png", "b", "val", "used", ""),
            ("a/5.png", "a", "train", "skipped", "duplicate of a/1.png"),
            ("a/x.jpg", "a", "train", "skipped", "truncated image"),
            ("b/y.jpg", "b", "train", "skipped", "truncated image"),
            ("a/s.png", "a", "train", "skipped", "conflicting labels: a, b"),
            ("b/s.png", "b", "train", "skipped", "conflicting labels: a, b"),
            ("b/.DS_Store", "b", "train", "skipped", "hidden file")]
    return pd.DataFrame(rows, columns=["path", "class", "split", "status", "reason"]).assign(hash="")


def test_counts_reasons_and_imbalance():
    report = data_card(manifest(), ["a", "b"], {"layout": "pre-split"})
    assert report["per_class"] == {"a": {"train": 3, "val": 0, "test": 1, "total": 4},
                                   "b": {"train": 1, "val": 1, "test": 0, "total": 2}}
    assert report["per_split"] == {"train": 4, "val": 1, "test": 1}
    assert report["skipped_by_reason"] == {"conflicting labels": 2, "duplicate": 1, "hidden file": 1,
                                           "truncated image": 2}
    assert report["duplicates_skipped"] == 1
    assert report["conflicting_label_files"] == ["a/s.png", "b/s.png"]
    assert report["imbalance_ratio"] == 3.0
    assert summary_line(report) == ("6 images used, 6 files skipped (2 conflicting labels, 1 duplicate, "
                                    "1 hidden file, 2 truncated image); class imbalance 3.00:1")


def test_markdown_lists_what_a_person_needs():
    md = to_markdown(data_card(manifest(), ["a", "b"]), manifest())
    assert "| a | 3 | 0 | 1 | 4 |" in md and "| **all** | 4 | 1 | 1 | 6 |" in md
    assert "| `a/x.jpg` | a | truncated image |" in md
    assert "## Conflicting labels" in md and "- `b/s.png`" in md
    assert "class_weights: balanced" in md
