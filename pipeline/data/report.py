"""The data report: what prepare used and skipped, per class and split, from the manifest."""
from __future__ import annotations

import pandas as pd

from pipeline.data.source import SPLITS


def reason_kind(reason: str) -> str:
    """'duplicate of a/b.png' → 'duplicate'; 'unreadable: Permission denied' → 'unreadable'."""
    if reason.startswith("duplicate of"):
        return "duplicate"
    return reason.split(":", 1)[0].strip()


def data_report(manifest: pd.DataFrame, classes: list[str], notes: dict | None = None,
                dataset: dict | None = None) -> dict:
    """Counts per class and split, skipped files by reason, duplicates, conflicting labels and
    the class imbalance ratio (largest / smallest class in the train split); `dataset`: its
    name and where it came from ({"name": ..., "source": ..., "path": ...})."""
    used = manifest[manifest["status"] == "used"]
    skipped = manifest[manifest["status"] == "skipped"]
    table = (used.groupby(["class", "split"]).size().unstack(fill_value=0)
             .reindex(index=classes, columns=list(SPLITS), fill_value=0))
    per_class = {c: {s: int(table.loc[c, s]) for s in SPLITS} | {"total": int(table.loc[c].sum())} for c in classes}
    train_counts = table["train"]
    conflicts = skipped[skipped["reason"].str.startswith("conflicting labels")]
    return {
        "dataset": dataset or {},
        "images_used": int(len(used)),
        "files_skipped": int(len(skipped)),
        "per_split": {s: int(table[s].sum()) for s in SPLITS},
        "per_class": per_class,
        "skipped_by_reason": {k: int(v) for k, v in skipped["reason"].map(reason_kind).value_counts().sort_index().items()},
        "duplicates_skipped": int(skipped["reason"].str.startswith("duplicate of").sum()),
        "conflicting_label_files": sorted(conflicts["path"].astype(str)),
        "imbalance_ratio": float(train_counts.max() / train_counts.min()) if train_counts.min() > 0 else float("inf"),
        "notes": notes or {},
    }


def summary_line(report: dict) -> str:
    """One line for the terminal."""
    line = f"{report['images_used']} images used"
    if report["files_skipped"]:
        reasons = ", ".join(f"{n} {k}" for k, n in report["skipped_by_reason"].items())
        line += f", {report['files_skipped']} files skipped ({reasons})"
    return line + f"; class imbalance {report['imbalance_ratio']:.2f}:1"


def to_markdown(report: dict, manifest: pd.DataFrame, max_files: int = 100) -> str:
    about = report.get("dataset") or {}
    title = f"# Data report: {about['name']}" if about.get("name") else "# Data report"
    where = [f"Data set `{about['source']}`" + (f", images from `{about['path']}`" if about.get("path") else "") + ".",
             ""] if about.get("source") else []
    lines = [title, "", *where, f"{summary_line(report)}.", "", "## Images per class and split", "",
             "| class | train | val | test | total |", "|---|---:|---:|---:|---:|"]
    for c, row in report["per_class"].items():
        lines.append(f"| {c} | {row['train']} | {row['val']} | {row['test']} | {row['total']} |")
    per_split = report["per_split"]
    lines += [f"| **all** | {per_split['train']} | {per_split['val']} | {per_split['test']} | {report['images_used']} |", "",
              f"Imbalance ratio (largest / smallest class, train split): {report['imbalance_ratio']:.2f}. "
              "With a large ratio, consider `train.class_weights: balanced` or `train.sampler: balanced`.", ""]
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
