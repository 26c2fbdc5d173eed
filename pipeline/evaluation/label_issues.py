"""Label issues: the images whose given label the model doubts most, found by cleanlab's
confident learning (`cleanlab.filter.find_label_issues`, its default filter
"prune_by_noise_rate", ranked by self-confidence) on out-of-fold probabilities from
cross-validation (metrics/oof_predictions.csv) or, with cross-validation off, on the model's
probabilities for the validation split. The output says which (`source`), because the two mean
different things: out-of-fold probabilities come from a model that never saw the image, cover
all of train+val; validation ones from a model not trained on them (though chosen on them),
cover only that split.

Measured (cleanlab 2.9.0, n_jobs=1, 2 shared Xeon cores; synthetic probabilities, 10 classes,
median of 7): find_label_issues takes 4 ms on 1,800 images (8 flagged) and 70 ms on 50,000
(303 flagged); importing cleanlab takes 0.9 s once. cleanlab's default n_jobs (a forked pool,
one process per physical core) took 24 ms and 102 ms, so n_jobs=1: faster here, and no fork
of a process that may hold CUDA. The results do not depend on n_jobs.

cleanlab on small data (measured on scikit-learn's digits, 3 labels flipped on purpose,
out-of-fold logistic regression, 5 folds): an image is flagged only when the model's
probability of some other class j reaches class j's threshold, the mean probability of j over
the images labelled j. An under-confident model therefore misses flips even at p_given 0.001:
1,000 images (C=10), 12 random draws: all three flips ranked top 3 in 7, two of three found in
5; 800 images (C=1), 10 draws: in 2 cleanlab flagged nothing at all. A class with 0 or 1 labelled images
cannot be flagged (cleanlab warns; kept in attrs["warnings"]). cleanlab does not check that
rows sum to 1, so they are normalised here; no images, one given class only, non-finite or
negative probabilities give an empty table whose attrs["reason"] says why.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import UserError
from pipeline.core.io import atomic_path
from pipeline.text import shorten

COLUMNS = ["rank", "split", "index", "given", "suggested", "p_given", "p_suggested", "label_quality", "source",
           "checked"]
FLOAT_FORMAT = "%.6f"
RERUN = "re-run cross-validation: dvc repro -f train"


# ---------------------------------------------------------------- reading the out-of-fold file

def oof_probabilities(path: Path, classes: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray] | None:
    """(ids: split, index; integer labels; N×K probabilities in the order of `classes`) from
    metrics/oof_predictions.csv; None when the file is missing, empty or from crossval off
    (summarize then writes only the header)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        table = pd.read_csv(path, dtype={"split": str, "label": str})  # class names like "0" stay strings
    except (pd.errors.ParserError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged (not a CSV table); {RERUN}") from None
    _check_columns(table, path, classes)
    if table.empty:
        return None
    probs = table[[f"p_{c}" for c in classes]].to_numpy(np.float64)
    if not np.isfinite(probs).all():
        raise UserError(f"{path} has missing or non-numeric probabilities; {RERUN}")
    return table[["split", "index"]].astype({"index": np.int64}), _label_ids(table["label"], classes, path), probs


def _check_columns(table: pd.DataFrame, path: Path, classes: Sequence[str]) -> None:
    missing = {"split", "index", "label"} - set(table.columns)
    if missing:
        raise UserError(f"{path} is not an out-of-fold predictions file (no {', '.join(sorted(missing))} column); "
                        f"{RERUN}")
    in_file = [c[2:] for c in table.columns if c.startswith("p_")]
    if in_file and set(in_file) != set(classes):  # header-only (crossval off) has no p_ columns
        raise UserError(f"{path} has classes {in_file} but the model has {list(classes)}; {RERUN}")


def _label_ids(names: pd.Series, classes: Sequence[str], path: Path) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(map(str, set(names) - set(index)))
    if unknown:
        raise UserError(f"{path} has labels {unknown[:5]} that are not classes of the model; {RERUN}")
    return names.map(index).to_numpy(np.int64)


# ---------------------------------------------------------------- finding the issues

def find_label_issues(ids: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                      source: str) -> pd.DataFrame:
    """The images cleanlab flags, most suspicious first (rank 1: the lowest probability of the
    given label; ties by position). Columns: COLUMNS less `checked`. When cleanlab cannot run,
    an empty table; attrs["reason"] says why ("" when it ran), attrs["warnings"] what cleanlab
    warned, attrs["source"] the source."""
    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    assert len(ids) == len(labels) == len(probs) and probs.shape[1:] == (len(classes),), "ids, labels, probs disagree"
    assert "\n" not in source, "source is one line"
    assert ((labels >= 0) & (labels < len(classes))).all(), "labels index classes"
    reason, ranked, quality, caught = _cannot_run(labels, probs), np.zeros(0, np.int64), np.zeros(len(labels)), []
    if not reason:
        probs = _normalise(probs)
        ranked, quality, caught, reason = _cleanlab(labels, probs)
    table = _issue_table(ids, labels, probs, quality, classes, source, ranked)
    table.attrs.update(reason=reason, warnings=caught, source=source)
    return table


def _cannot_run(labels: np.ndarray, probs: np.ndarray) -> str:
    """Why cleanlab cannot judge these labels, or "" when it can."""
    if len(labels) == 0:
        return "no images to check"
    if not np.isfinite(probs).all() or (probs < 0).any():
        return "the probabilities are not all finite and non-negative"
    if (probs.sum(axis=1) <= 0).any():
        return "a row of probabilities sums to 0"
    if len(np.unique(labels)) < 2:
        return "all images have the same given label (cleanlab needs at least 2 classes)"
    return ""


def _normalise(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum(axis=1, keepdims=True)


def _cleanlab(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """cleanlab's flagged indices ranked by self-confidence (ties by position); every image's
    self-confidence score; cleanlab's warnings, each once; the reason when it raised ("" otherwise)."""
    import cleanlab.filter
    import cleanlab.rank

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            flagged = cleanlab.filter.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence",
                                                        n_jobs=1)
        except ValueError as exc:  # cleanlab's own input checks
            return np.zeros(0, np.int64), np.zeros(len(labels)), [], f"cleanlab: {str(exc).splitlines()[0]}"
        quality = cleanlab.rank.get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = np.asarray(flagged, np.int64)
    ranked = flagged[np.lexsort((flagged, quality[flagged]))]
    return ranked, quality, list(dict.fromkeys(str(w.message) for w in caught)), ""


def _issue_table(ids: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, quality: np.ndarray,
                 classes: Sequence[str], source: str, ranked: np.ndarray) -> pd.DataFrame:
    names = np.asarray(list(classes), dtype=object)
    given, p = labels[ranked], probs[ranked]
    suggested = p.argmax(axis=1)
    return pd.DataFrame({
        "rank": np.arange(1, len(ranked) + 1, dtype=np.int64),
        "split": ids["split"].to_numpy()[ranked].astype(str),
        "index": ids["index"].to_numpy(np.int64)[ranked],
        "given": names[given].astype(str), "suggested": names[suggested].astype(str),
        "p_given": p[np.arange(len(p)), given], "p_suggested": p[np.arange(len(p)), suggested],
        "label_quality": quality[ranked],  # self_confidence: the probability of the given label, once more
        "source": np.full(len(ranked), source, dtype=object)})


# ---------------------------------------------------------------- writing

def write_label_issues(table: pd.DataFrame, path: Path, source: str, n_checked: int) -> None:
    """CSV, one row per flagged image in rank order, columns COLUMNS; `source` and `checked`
    (how many images were checked) on every row; the header alone when nothing was flagged.
    Floats with 6 decimals, "\\n" line ends: byte-identical for the same input."""
    assert "\n" not in source, "source is one line"
    assert (table["source"] == source).all(), "the table was found on another source"
    out = table.assign(source=source, checked=int(n_checked))[COLUMNS]
    with atomic_path(Path(path)) as tmp:
        out.to_csv(tmp, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


# ---------------------------------------------------------------- the picture

COLS = 6              # suspects a row
CELL = (1.9, 1.95)    # inches per suspect (width, height): a 1.5 in image under a two-line title
HEADER = 0.5          # inches above the grid for the figure's title
NAME_CHARS = 11       # class names are cut to this many characters in the titles


def suspects_size(shown: int) -> tuple[int, int]:
    """The suspects PNG's (width, height) in pixels for `shown` images (≥ 1): always COLS
    cells wide, one row of CELL per COLS images."""
    from pipeline.plots import DPI, matplotlib

    pad = matplotlib.rcParams["savefig.pad_inches"]  # inches pipeline.plots.save adds each side (bbox "tight")
    rows = max(1, -(-shown // COLS))
    return round((COLS * CELL[0] + 2 * pad) * DPI), round((HEADER + rows * CELL[1] + 2 * pad) * DPI)


def suspect_title(row: dict) -> str:
    """'given → suggested (p_suggested)' over 'split #index'."""
    names = f"{shorten(row['given'], NAME_CHARS)} → {shorten(row['suggested'], NAME_CHARS)}"
    return f"{names} ({row['p_suggested']:.2f})\n{row['split']} #{row['index']}"


def suspects_figure(images: np.ndarray, table: pd.DataFrame, classes: Sequence[str], path: Path, n: int = 24) -> None:
    """The top `n` suspects (uint8 3×S×S crops, in table order) in a grid, each titled
    "given → suggested (p_suggested)" and its split #index; a figure of suspects_size(shown)
    pixels. With none, a note that says why."""
    from pipeline.plots import note_figure, plt, save

    shown = min(n, len(table))
    if shown == 0:
        why = table.attrs.get("reason") or "cleanlab flagged none of the images"
        why += f"; source: {shorten(table.attrs['source'], 60)}" if table.attrs.get("source") else ""
        note_figure(f"No label issues to show\n({why})", Path(path))
        return
    assert len(images) >= shown, "an image for every suspect shown"
    assert set(table["given"][:shown]) | set(table["suggested"][:shown]) <= set(classes), "class names of the model"
    rows = -(-shown // COLS)
    width, height = COLS * CELL[0], HEADER + rows * CELL[1]
    fig = plt.figure(figsize=(width, height))
    fig.add_axes((0, 0, 1, 1)).axis("off")  # spans the figure, so the saved size is the figure's plus the pad
    for i, row in enumerate(table.head(shown).to_dict("records")):
        _suspect_axes(fig, images[i], suspect_title(row), i, width, height)
    source = shorten(table["source"].iloc[0], 80)
    fig.suptitle(f"Label issues: the {shown} most suspicious of {len(table)} flagged; source: {source}\n"
                 "given label → suggested class (model probability of the suggested class)", fontsize=10,
                 y=1 - 0.08 / height, va="top")
    save(fig, Path(path), whole=True)  # its first axes spans the figure: "tight" would find the same box, slower


def _suspect_axes(fig, image: np.ndarray, title: str, i: int, width: float, height: float) -> None:
    side = CELL[0] - 0.4  # inches: the image, square, centred in its cell under the title
    left = (i % COLS) * CELL[0] + 0.2
    bottom = height - HEADER - (i // COLS + 1) * CELL[1] + 0.1
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    ax.imshow(np.asarray(image).transpose(1, 2, 0), interpolation="nearest")
    ax.set_title(title, fontsize=7.5, pad=3, y=1.0)  # y given: not placed by the extent (slow)
    ax.axis("off")
