"""The data card: what the data set is and what prepare made of it, drawn from its manifest
and duplicate pairs. Counts per class and split, the images' own sizes and modes, files skipped
and why, class balance, the groups of duplicates within and across splits with a picture of
them side by side, what leaked across the splits a data set came with, and the data set's
name, path and hash. metrics/data_card.json (the numbers), metrics/data_card.md (for people),
metrics/data_card_duplicates.png."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.source import SPLITS

SHOWN_PAIRS = 16      # pairs in the picture, most alike first
NEAR_THRESHOLD = 8    # and pairs nearest the threshold, to judge where it cuts


def reason_kind(reason: str) -> str:
    """'duplicate of a/b.png' → 'duplicate'; 'unreadable: Permission denied' → 'unreadable'."""
    if reason.startswith("duplicate of"):
        return "duplicate"
    return reason.split(":", 1)[0].strip()


def data_card(manifest: pd.DataFrame, classes: list[str], notes: dict | None = None, dataset: dict | None = None,
              pairs: pd.DataFrame | None = None, meta: dict | None = None, data=None) -> dict:
    """Counts per class and split, skipped files by reason, files skipped as byte-identical
    copies, conflicting labels, the class imbalance ratio (largest / smallest class in the
    train split), image sizes and modes, duplicates and leakage (`pairs`: prepare's
    duplicates.csv; `meta`: its meta.json; `data`: the data params); `dataset`: its name and
    where it came from ({"name": ..., "source": ..., "path": ..., "hash": ...})."""
    used = manifest[manifest["status"] == "used"]
    skipped = manifest[manifest["status"] == "skipped"]
    sep = (notes or {}).get("label_separator") if (meta or {}).get("task") == "multilabel" else None
    labelled = used if sep is None else used.assign(**{"class": used["class"].str.split(sep)}).explode("class")
    table = (labelled.groupby(["class", "split"]).size().unstack(fill_value=0)
             .reindex(index=classes, columns=list(SPLITS), fill_value=0))
    per_class = {c: {s: int(table.loc[c, s]) for s in SPLITS} | {"total": int(table.loc[c].sum())} for c in classes}
    train_counts = table["train"]
    conflicts = skipped[skipped["reason"].str.startswith("conflicting labels")]
    card = {
        "dataset": dataset or {},
        "images_used": int(len(used)),
        "files_skipped": int(len(skipped)),
        "per_split": {s: int((used["split"] == s).sum()) for s in SPLITS},
        "per_class": per_class,
        "skipped_by_reason": {k: int(v) for k, v in skipped["reason"].map(reason_kind).value_counts().sort_index().items()},
        "duplicates_skipped": int(skipped["reason"].str.startswith("duplicate of").sum()),
        "conflicting_label_files": sorted(conflicts["path"].astype(str)),
        "imbalance_ratio": float(train_counts.max() / train_counts.min()) if train_counts.min() > 0 else float("inf"),
        "images": _sizes(used),
        "duplicates": _duplicates(used, pairs, meta or {}, data),
        "notes": notes or {},
    }
    if sep is not None:
        card["multilabel"] = multilabel_stats(used, classes, sep)
    return card


def multilabel_stats(used: pd.DataFrame, classes: list[str], sep: str) -> dict:
    """Per label its positive rate (the fraction of images that carry it), how many labels an
    image carries, and how often two labels come together (images with both)."""
    index = {c: k for k, c in enumerate(classes)}
    y = np.zeros((len(used), len(classes)), dtype=np.int64)
    for i, text in enumerate(used["class"].astype(str)):
        y[i, [index[t] for t in text.split(sep) if t in index]] = 1
    together = y.T @ y
    per_image = y.sum(axis=1)
    return {"positive_rate": {c: float(y[:, k].mean()) for c, k in index.items()},
            "labels_per_image": {"mean": float(per_image.mean()) if len(y) else 0.0,
                                 "counts": {int(n): int((per_image == n).sum()) for n in np.unique(per_image)}},
            "images_without_label": int((per_image == 0).sum()),
            "cooccurrence": {"labels": list(classes), "matrix": together.tolist()}}


def _multilabel_md(stats: dict) -> list[str]:
    if not stats:
        return []
    labels, m = stats["cooccurrence"]["labels"], stats["cooccurrence"]["matrix"]
    sizes = ", ".join(f"{n}: {c}" for n, c in stats["labels_per_image"]["counts"].items())
    lines = ["## Labels (multi-label)", "",
             f"Labels per image: mean {stats['labels_per_image']['mean']:.2f} (images by how many labels they carry: "
             f"{sizes}); {stats['images_without_label']} images carry none (a negative for every label).", "",
             "Positive rate (the fraction of images with the label) and co-occurrence (images with both labels; the "
             "diagonal: images with the label):", "",
             "| label | positive rate | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    lines += [f"| {a} | {stats['positive_rate'][a]:.3f} | " + " | ".join(str(v) for v in row) + " |"
              for a, row in zip(labels, m)]
    return lines + [""]


def _sizes(used: pd.DataFrame) -> dict:
    """The images' own sizes (before prepare resized them) and modes."""
    if "width" not in used or not len(used):
        return {}
    w, h = used["width"].astype(int), used["height"].astype(int)
    common = (w.astype(str) + "×" + h.astype(str)).value_counts()
    return {"width": {"min": int(w.min()), "median": float(w.median()), "max": int(w.max())},
            "height": {"min": int(h.min()), "median": float(h.median()), "max": int(h.max())},
            "most_common_sizes": {k: int(v) for k, v in common.head(5).items()},
            "distinct_sizes": int(len(common)),
            "modes": {k: int(v) for k, v in used["mode"].value_counts().sort_index().items()}}


def _duplicates(used: pd.DataFrame, pairs: pd.DataFrame | None, meta: dict, data) -> dict:
    """Pairs and groups of duplicates within and across splits, and what leaked."""
    if pairs is None:
        return {}
    in_groups = used["group"].astype(int).value_counts() if "group" in used else pd.Series(dtype=int)
    dup_groups = set(pairs["group"].astype(int)) if len(pairs) else set()
    sizes = in_groups[in_groups.index.isin(dup_groups)]
    where = pairs["split_a"].astype(str) + "-" + pairs["split_b"].astype(str)
    where = where.map(lambda k: "-".join(sorted(k.split("-"), key=SPLITS.index)))
    out = {"threshold": getattr(data, "duplicate_threshold", None),
           "pairs": int(len(pairs)), "exact_pairs": int((pairs["kind"] == "exact").sum()),
           "near_pairs": int((pairs["kind"] == "near").sum()),
           "groups": int(len(sizes)), "images_in_groups": int(sizes.sum()), "largest_group": int(sizes.max()) if len(sizes) else 0,
           "pairs_by_splits": {k: int(v) for k, v in where.value_counts().sort_index().items()},
           "leaked": meta.get("leaked", {}), "leakage": getattr(data, "leakage", None)}
    if getattr(data, "group_by", None):
        out["group_by"] = {"pattern": data.group_by, "groups_kept_whole": int(used["group"].astype(int).nunique())}
    return out


def duplicates_figure(pairs: pd.DataFrame, manifest: pd.DataFrame, prepared: Path, path: Path,
                      threshold: float) -> bool:
    """The most alike pairs (across splits first) and the pairs nearest the threshold, side by
    side as prepare stored them; False (nothing drawn) when there are none."""
    if not len(pairs):
        return False
    from pipeline.plots import pair_figure, save
    from pipeline.prepared import load_split

    arrays = {s: load_split(s, prepared)[0] for s in SPLITS}
    where = {p: (s, int(r)) for p, s, r in manifest[manifest["status"] == "used"][["path", "split", "row"]]
             .itertuples(index=False, name=None)}
    pairs = pairs[pairs["path_a"].isin(where) & pairs["path_b"].isin(where)]  # not those dropped from test
    if not len(pairs):
        return False
    across = pairs["split_a"] != pairs["split_b"]
    top = pd.concat([pairs[across], pairs[~across]]).head(SHOWN_PAIRS)
    low = pairs.drop(top.index).sort_values("similarity").head(NEAR_THRESHOLD)
    shown = pd.concat([top, low])
    per_row = 4
    slots = list(range(len(top))) + [(-(-len(top) // per_row)) * per_row + i for i in range(len(low))]

    def image(p: str) -> np.ndarray:
        split, row = where[p]
        return np.asarray(arrays[split][row])
    lefts = np.stack([image(p) for p in shown["path_a"]])
    rights = np.stack([image(p) for p in shown["path_b"]])
    titles = [f"{r.similarity:.3f} {r.split_a}/{r.class_a} · {r.split_b}/{r.class_b}" for r in shown.itertuples()]
    colors = ["firebrick" if a != b else "black" for a, b in zip(shown["split_a"], shown["split_b"])]
    heading = (f"Duplicates: the most alike pairs (red: in two splits), then the {len(low)} nearest the threshold "
               f"({threshold:g})" if len(low) else "Duplicates: the most alike pairs (red: in two splits)")
    save(pair_figure(lefts, rights, titles, ("", ""), heading, per_row, colors, slots), path, whole=True)
    return True


def summary_line(report: dict) -> str:
    """One line for the terminal."""
    line = f"{report['images_used']} images used"
    if report["files_skipped"]:
        reasons = ", ".join(f"{n} {k}" for k, n in report["skipped_by_reason"].items())
        line += f", {report['files_skipped']} files skipped ({reasons})"
    line += f"; class imbalance {report['imbalance_ratio']:.2f}:1"
    if (dup := report.get("duplicates")) and dup["pairs"]:
        line += f"; {dup['pairs']} duplicate pairs in {dup['groups']} groups"
    elif dup:
        line += "; no duplicate images"
    return line


def leakage_line(report: dict) -> str:
    """A loud line when val or test images have a near-duplicate or group member in an earlier
    split (a data set split by its maker); '' when none do."""
    dup = report.get("duplicates") or {}
    leaked = dup.get("leaked") or {}
    if not (leaked.get("test") or leaked.get("val")):
        return ""
    what = " and ".join(f"{leaked[s]} {s}" for s in ("test", "val") if leaked.get(s))
    return (f"LEAKAGE: {what} images have a near-duplicate or group member in train (or val); the test score "
            "overstates accuracy on new images: evaluate adds accuracy on the clean test images. "
            "data.leakage: drop_from_test removes them, error refuses the data set")


def to_markdown(report: dict, manifest: pd.DataFrame, max_files: int = 100) -> str:
    about = report.get("dataset") or {}
    title = f"# Data card: {about['name']}" if about.get("name") else "# Data card"
    where = [f"Data set `{about['source']}`" + (f", images from `{about['path']}`" if about.get("path") else "") + "."
             + (f" Content hash `{about['hash'][:16]}` (sha256 of every used image's path, label and bytes or "
                "pixels)." if about.get("hash") else ""), ""] if about.get("source") else []
    loud = [f"**{leakage_line(report)}**", ""] if leakage_line(report) else []
    labels = "multilabel" in report  # task=multilabel: a row per label, counting the images that carry it
    lines = [title, "", *where, *loud, f"{summary_line(report)}.", "",
             "## Images per label and split" if labels else "## Images per class and split", "",
             f"| {'label' if labels else 'class'} | train | val | test | total |", "|---|---:|---:|---:|---:|"]
    for c, row in report["per_class"].items():
        lines.append(f"| {c} | {row['train']} | {row['val']} | {row['test']} | {row['total']} |")
    per_split = report["per_split"]
    lines += [f"| **all** | {per_split['train']} | {per_split['val']} | {per_split['test']} | {report['images_used']} |", "",
              f"Imbalance ratio (largest / smallest {'label' if labels else 'class'}, train split): "
              f"{report['imbalance_ratio']:.2f}. With a large ratio, consider `train.class_weights: balanced`"
              + (" (each label's positives weighed by its negatives)." if labels else " or `train.sampler: balanced`."),
              ""]
    lines += _multilabel_md(report.get("multilabel") or {})
    lines += _sizes_md(report.get("images") or {}) + _duplicates_md(report.get("duplicates") or {})
    skipped = manifest[manifest["status"] == "skipped"]
    if len(skipped):
        lines += ["## Skipped files", "", "| reason | files |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in report["skipped_by_reason"].items()]
        lines += ["", "| file | class | reason |", "|---|---|---|"]
        rows = skipped.head(max_files)[["path", "class", "reason"]].itertuples(index=False, name=None)
        lines += [f"| `{p}` | {c} | {r} |" for p, c, r in rows]
        if len(skipped) > max_files:
            lines.append(f"| … {len(skipped) - max_files} more in data/prepared/manifest.csv | | |")
        lines.append("")
    if report["conflicting_label_files"]:
        lines += ["## Conflicting labels", "", "The same image (identical bytes) appears under more than one class; "
                  "every copy was skipped. Fix the labels and re-run:", ""]
        lines += [f"- `{p}`" for p in report["conflicting_label_files"]] + [""]
    for key, value in report["notes"].items():
        if value:
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    return "\n".join(lines) + "\n"


def _sizes_md(images: dict) -> list[str]:
    if not images:
        return []
    w, h = images["width"], images["height"]
    common = ", ".join(f"{k} ({v})" for k, v in images["most_common_sizes"].items())
    modes = ", ".join(f"{k} {v}" for k, v in images["modes"].items())
    return ["## Image sizes and modes", "", "Each image's own size, before prepare resized it.", "",
            f"- width {w['min']} to {w['max']} pixels (median {w['median']:g}), height {h['min']} to {h['max']} "
            f"(median {h['median']:g}); {images['distinct_sizes']} distinct sizes, most common: {common}",
            f"- modes: {modes}", ""]


def _duplicates_md(dup: dict) -> list[str]:
    if not dup:
        return []
    if not dup["pairs"]:
        return ["## Duplicates and leakage", "", f"No duplicate images: no two have the same pixels or 16×16 thumbnails "
                f"at least {dup['threshold']:g} alike (data.duplicate_threshold).", ""]
    lines = ["## Duplicates and leakage", "",
             f"{dup['pairs']} pairs of duplicate images ({dup['exact_pairs']} exact: the same pixels; {dup['near_pairs']} "
             f"near: 16×16 thumbnails at least {dup['threshold']:g} alike), in {dup['groups']} groups of "
             f"{dup['images_in_groups']} images (the largest {dup['largest_group']}). Each group was kept in one split "
             "where prepare split the data; every pair is in data/prepared/duplicates.csv.", ""]
    if dup["pairs_by_splits"]:
        lines += ["| splits | pairs |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in dup["pairs_by_splits"].items()] + [""]
    leaked = dup.get("leaked") or {}
    if leaked.get("test") or leaked.get("val"):
        lines += [f"Leakage (the data set came split): {leaked.get('test', 0)} test and {leaked.get('val', 0)} val images "
                  f"have a near-duplicate or group member in an earlier split (data.leakage: {dup['leakage']}).", ""]
    if group_by := dup.get("group_by"):
        lines += [f"data.group_by `{group_by['pattern']}`: {group_by['groups_kept_whole']} groups kept whole "
                  "(duplicates joined in).", ""]
    if dup["pairs"]:
        lines += ["![duplicate pairs](data_card_duplicates.png)", ""]
    return lines
