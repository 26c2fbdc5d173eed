"""Groups of images that must stay together, and splits that keep them whole.

A group is a set of images joined by near-duplicate pairs (`pipeline.data.duplicates`) and,
with `data.group_by`, by a shared match of a regular expression over their paths (a patient,
an object, a visit). The random split and cross-validation's folds put every group in one
split or fold; a data set split by its maker keeps its splits, and a group that spans them is
leakage, reported (`leakage`) and, by `data.leakage`, dropped from test or refused.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from pipeline.core.errors import UserError


def path_groups(names: Sequence[str], pattern: str | None) -> np.ndarray:
    """The group number of each path under data.group_by (its first capture group, or the
    whole match when it has none); -1 where the expression does not match. All -1 without one."""
    if pattern is None:
        return np.full(len(names), -1, dtype=np.int64)
    regex = re.compile(pattern)
    keys = []
    for name in names:
        m = regex.search(str(name).replace("\\", "/"))
        keys.append(None if m is None else (m.group(1) if regex.groups else m.group(0)))
    if all(k is None for k in keys):
        example = str(names[0]) if len(names) else ""
        raise UserError(f"data.group_by={pattern!r} matches no image path (e.g. {example!r}); write it for paths "
                        "relative to data_dir, such as '([^/_]+)_[^/]*$' for files named <patient>_<n>.jpg")
    index: dict[str, int] = {}
    return np.array([-1 if k is None else index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                  need: tuple[str, ...] = ("val", "test"), groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Seeded, stratified split of positions 0..len(labels)-1 into train and the `need`ed
    splits. Both carved: test_fraction and val_fraction of the whole; one carved: its
    fraction of the whole. With `groups` (a number per position) that join two or more
    positions, every group lands whole in one split (`group_split`)."""
    if groups is not None and len(np.unique(groups)) < len(groups):
        return group_split(labels, groups, {s: val_fraction if s == "val" else test_fraction for s in need}, seed)
    if labels.ndim == 2:
        return multilabel_split(labels, val_fraction, test_fraction, seed, need)
    from sklearn.model_selection import train_test_split  # here: a pre-split folder's prepare never imports it (1.4 s)

    idx = np.arange(len(labels))
    out: dict[str, np.ndarray] = {}
    try:
        rest = idx
        if "test" in need:
            rest, out["test"] = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        if "val" in need:
            frac = val_fraction / (1.0 - test_fraction) if "test" in need else val_fraction
            rest, out["val"] = train_test_split(rest, test_size=frac, stratify=labels[rest], random_state=seed)
    except ValueError as exc:  # too few images per class for the requested fractions
        raise UserError(f"cannot split the data set: {exc}; add images or change data.val_fraction/test_fraction") from None
    out["train"] = rest
    return {k: np.sort(v) for k, v in out.items()}


def group_split(labels: np.ndarray, groups: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Whole groups to train and the splits in `fractions` (each that fraction of the images of
    every class): groups in a seeded random order, largest first, each to the split furthest
    below its share of the group's classes. scikit-learn's StratifiedGroupKFold (used for the
    folds) cuts equal parts only, and GroupShuffleSplit does not stratify: hence this greedy
    fill, which meets the fractions within a group's size per class."""
    names = ["train", *fractions]
    share = np.array([1.0 - sum(fractions.values()), *fractions.values()])
    _, g = np.unique(groups, return_inverse=True)
    counts = group_counts(labels, g)
    target = share[:, None] * counts.sum(axis=0)[None, :]          # images of each class each split should get
    have = np.zeros_like(target)
    order = np.random.default_rng(seed).permutation(len(counts))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    place = np.empty(len(counts), dtype=np.int64)
    for k in order:
        gap = ((target - have) / np.maximum(target, 1.0)) @ counts[k]  # how far below its share, weighted by the group's classes
        place[k] = int(np.argmax(gap))
        have[place[k]] += counts[k]
    for s, name in enumerate(names):
        if (short := np.flatnonzero((have[s] == 0) & (target[s] >= 2))).size:
            biggest = int(counts[counts[:, short[0]] > 0].sum(axis=1).max())
            raise UserError(f"cannot split the data set with its groups kept whole: class {short[0]} would have no "
                            f"{name} image (its largest group holds {biggest} images); raise data.duplicate_threshold "
                            "or change data.group_by so that groups are smaller")
    split_of = place[g]
    return {name: np.flatnonzero(split_of == s) for s, name in enumerate(names)}


def group_counts(labels: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per group (0..G-1), its images of each class; for k-hot labels its positives of each
    label and, in a last column, its images with no label (so they are spread as well)."""
    if labels.ndim == 2:
        columns = np.concatenate([labels, (labels.sum(axis=1) == 0)[:, None]], axis=1).astype(np.float64)
        counts = np.zeros((g.max() + 1, columns.shape[1]))
        np.add.at(counts, g, columns)
        return counts
    counts = np.zeros((g.max() + 1, int(labels.max()) + 1))
    np.add.at(counts, (g, labels), 1)
    return counts


def multilabel_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     need: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The split of k-hot labels by iterative stratification (Sechidis et al. 2011; the
    iterative-stratification package): each label's positives spread over the splits in
    proportion, rarest labels first."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    idx, out = np.arange(len(labels)), {}
    rest = idx
    for split in ("test", "val"):
        if split not in need:
            continue
        frac = test_fraction if split == "test" else (val_fraction / (1.0 - test_fraction) if "test" in need
                                                        else val_fraction)
        cut = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
        keep, held = next(cut.split(np.zeros(len(rest)), labels[rest]))
        rest, out[split] = rest[keep], rest[held]
    out["train"] = rest
    return {k: np.sort(v) for k, v in out.items()}


def leakage(split_of: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Per split (val, test), the positions whose group also has a member in an earlier split
    (train; for test, train or val): images the model may in effect have seen."""
    out = {}
    for split, before in (("val", ("train",)), ("test", ("train", "val"))):
        seen = np.unique(groups[np.isin(split_of, before)])
        out[split] = np.flatnonzero((split_of == split) & np.isin(groups, seen))
    return out


def fold_assignments(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of every pooled train+val image: stratified, seeded; with groups that
    join images, scikit-learn's StratifiedGroupKFold keeps each group in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    grouped = groups is not None and len(np.unique(groups)) < len(groups)
    if y.ndim == 2:
        return multilabel_folds(y, groups if grouped else None, k, seed)
    cv = (StratifiedGroupKFold if grouped else StratifiedKFold)(n_splits=k, shuffle=True, random_state=seed)
    fold = np.empty(len(y), dtype=np.int64)
    for f, (_, held_out) in enumerate(cv.split(y, y, groups if grouped else None)):
        fold[held_out] = f
    return fold


def multilabel_folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> np.ndarray:
    """Folds of k-hot labels: iterative stratification (MultilabelStratifiedKFold); with groups,
    whole groups by `group_split` into k equal parts (no library stratifies multi-label groups)."""
    if groups is not None:
        parts = group_split(y, groups, {f"fold{f}": 1.0 / k for f in range(1, k)}, seed)
        fold = np.empty(len(y), dtype=np.int64)
        for f, name in enumerate(["train", *(f"fold{f}" for f in range(1, k))]):
            fold[parts[name]] = f
        return fold
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    fold = np.empty(len(y), dtype=np.int64)
    cv = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held_out) in enumerate(cv.split(np.zeros(len(y)), y)):
        fold[held_out] = f
    return fold
