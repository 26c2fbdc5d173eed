"""Exact and near-duplicate images, found over a whole data set, and the groups they form.

Every image gets two fingerprints while prepare decodes it (`fingerprint`): a digest of its
pixels at the stored size (exact copies: the same picture saved as PNG and as BMP) and a 16×16
RGB thumbnail. Two images are near-duplicates when their thumbnails' descriptors have a cosine
similarity of at least `data.duplicate_threshold` (0.9). The descriptor is the colour layout
(each channel centred on its own mean, so a plain blue sky adds nothing) beside the detail (each
pixel minus its 4×4 block's mean), each of length 1: layout alone paired different planes on
the same sky, detail alone paired pictures in alike frames.

Chosen by measurement on the 60,000 CIFAR-10 images (benchmarks/bench_duplicates.py): of
planted copies of 500 test images it finds all the downsized, JPEG-quality-30 and colour-shifted
ones and 97 % of those cropped by 3 % a side; 27 % of those cropped by 5 % a side and 9 % of a
6 % crop off one corner (larger or shifted crops, mirrored or rotated copies are not found).
99 % of the 249 test-train pairs it reports share their label (a wrong pair would one time in
ten), and by eye about 7 in 8 of the pairs just above the threshold are copies. A grey
thumbnail found fewer of the cropped copies at the same precision; the layout without its
detail made about half of the pairs just above its threshold of different planes on one sky.
Embeddings of an ImageNet backbone would also pair larger crops, but cost minutes of CPU per
60,000 images where this costs seconds.

The search is exhaustive, in blocks: the 8×8 colour layout (192 numbers) shortlists pairs (at
most 64 an image) by one matrix product per block of rows against the rows after it, and the
16×16 descriptors confirm them. Memory: about 4.5 kB per image (thumbnail, shortlist and
float16 descriptor; 4.5 GB for 1M images) plus one block (≤ 64 MB); time grows with the square of
the images: 17 s for 60,000 on 2 cores (4 s more for the thumbnails, made while decoding), about
80 minutes for 1M.
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

THUMB = 16               # the thumbnail's side, pixels
COARSE = 8               # the shortlist's side, pixels
SHORTLIST_MARGIN = 0.08  # the 8×8 shortlist keeps pairs this far below the threshold (on CIFAR-10 no pair the
                         # 16×16 descriptors put at ≥ 0.90 scored below 0.85 at 8×8)
SHORTLIST_PER_IMAGE = 64 # at most this many candidates an image, the most alike at 8×8 (a plain sky has hundreds)
MAX_PER_IMAGE = 32       # at most this many partners per image kept from one block (a burst of copies stays connected)
_BLOCK_BYTES = 64 << 20  # similarities computed per block


def fingerprint(image: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(digest of the pixels, 16×16×3 uint8 thumbnail) of one H×W×3 uint8 image."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
    thumb = np.asarray(Image.fromarray(image).resize((THUMB, THUMB), Image.BOX), dtype=np.uint8)
    return digest, thumb


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a flat image's all-zero row stays zero: similar to nothing)."""
    x = x.reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-3 * np.sqrt(x.shape[1]))


def _centred(thumbs: np.ndarray) -> np.ndarray:
    """Each channel minus its own mean: a uniform colour (a blue sky) adds nothing."""
    return thumbs - thumbs.mean(axis=(1, 2), keepdims=True)


def _detail(thumbs: np.ndarray) -> np.ndarray:
    """Each pixel minus the mean of its 4×4 block: the edges and texture, not the layout."""
    n = len(thumbs)
    blocks = thumbs.reshape(n, 4, 4, 4, 4, 3)
    return (blocks - blocks.mean(axis=(2, 4), keepdims=True)).reshape(thumbs.shape)


def descriptors(thumbs: np.ndarray) -> np.ndarray:
    """Unit-length descriptors of N×16×16×3 uint8 thumbnails: the colour layout (channels
    centred) and the detail, each scaled to length 1, side by side. Layout alone pairs different
    planes on the same sky; detail alone pairs pictures in alike frames."""
    t = thumbs.astype(np.float32)
    return _unit(np.concatenate([_unit(_centred(t)), _unit(_detail(t))], axis=1))


def shortlist_descriptors(thumbs: np.ndarray) -> np.ndarray:
    """The layout at 8×8 (192 numbers): cheap to compare all against all."""
    t = thumbs.astype(np.float32).reshape(len(thumbs), COARSE, 2, COARSE, 2, 3).mean(axis=(2, 4))
    return _unit(_centred(t))


def exact_pairs(digests: list[bytes]) -> np.ndarray:
    """(i, j) pairs, i < j, of images with the same pixels: each to the first of its kind."""
    first: dict[bytes, int] = {}
    pairs = []
    for i, d in enumerate(digests):
        if (j := first.setdefault(d, i)) != i:
            pairs.append((j, i))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def near_pairs(thumbs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(pairs i < j, their similarity) of thumbnails at least `threshold` alike."""
    n = len(thumbs)
    coarse = np.empty((n, 3 * COARSE * COARSE), dtype=np.float32)
    fine = np.empty((n, 2 * 3 * THUMB * THUMB), dtype=np.float16)  # half the memory; exact enough to 1e-3
    for s in range(0, n, 8192):
        coarse[s:s + 8192] = shortlist_descriptors(thumbs[s:s + 8192])
        fine[s:s + 8192] = descriptors(thumbs[s:s + 8192])
    rows = max(1, min(4096, _BLOCK_BYTES // (4 * max(n, 1))))
    found_i, found_j, found_s = [], [], []
    for s in range(0, n, rows):
        block = coarse[s:s + rows] @ coarse[s:].T       # rows s.. against columns s.. (the rest: earlier blocks)
        r, c = np.nonzero(block >= threshold - SHORTLIST_MARGIN)
        keep = c > r                                     # i < j, and not an image with itself
        r, c = r[keep], c[keep]
        r, c = _best_per_row(r, c, block[r, c], SHORTLIST_PER_IMAGE)
        sim = _similarity(fine, r + s, c + s)
        ok = sim >= threshold
        r, c, sim = r[ok], c[ok], sim[ok]
        r, c = _best_per_row(r, c, sim, MAX_PER_IMAGE)   # a burst of near-identical images stays connected
        found_i.append(r + s)
        found_j.append(c + s)
    i = np.concatenate(found_i) if found_i else np.zeros(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.zeros(0, np.int64)
    sim = _similarity(fine, i, j)
    return np.stack([i, j], axis=1).astype(np.int64), sim.astype(np.float64)


def _similarity(fine: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows i and j of the descriptors, in float32, a chunk at a time."""
    out = np.empty(len(i), dtype=np.float32)
    for s in range(0, len(i), 65536):
        a, b = fine[i[s:s + 65536]].astype(np.float32), fine[j[s:s + 65536]].astype(np.float32)
        out[s:s + 65536] = np.einsum("ij,ij->i", a, b)
    return out


def _best_per_row(r: np.ndarray, c: np.ndarray, score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (r, c) pairs with the k highest scores of each r (all of them where r has at most k)."""
    if len(r) <= k or np.bincount(r).max() <= k:
        return r, c
    order = np.lexsort((-score, r))
    rank = np.arange(len(order)) - np.searchsorted(r[order], r[order])
    keep = np.sort(order[rank < k])
    return r[keep], c[keep]


def components(n: int, pairs: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The connected component (0, 1, ... in order of first image) of each of n images, joined
    by `pairs` and by equal non-negative `labels` (e.g. data.group_by's groups; -1: none)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = [pairs]
    if labels is not None:
        idx = np.flatnonzero(labels >= 0)
        _, first = np.unique(labels[idx], return_inverse=True)
        heads = np.full(first.max() + 1 if len(first) else 0, -1, dtype=np.int64)
        heads[first[::-1]] = idx[::-1]                   # the first image of each labelled group
        edges.append(np.stack([heads[first], idx], axis=1))
    e = np.concatenate(edges).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    _, renumbered = np.unique(comp, return_index=True)  # number components by their first image
    order = np.argsort(renumbered)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[np.searchsorted(np.unique(comp), comp)].astype(np.int64)
