"""`pipeline predict MODEL IMAGE|FOLDER...`: the top-k classes of image files.

MODEL is an exported ONNX model (classes and preprocessing read from its metadata, or from the
JSON beside it; run by ONNX Runtime without importing torch) or a checkpoint (models/model.pt).
A FOLDER stands for its image files, found recursively and sorted by path as prepare scans a
folder data set (`pipeline.data.folder`); hidden files and other extensions are skipped and
counted on stderr. Every image goes through exactly the evaluation preprocessing (the model's
`Preprocessing`, on a numpy array for ONNX, on a tensor for the checkpoint: the same values):
decoded to RGB as prepare decodes a folder data set (`pipeline.images.decode_image`: EXIF
rotation, alpha on white, 16-bit scaled), resized to the stored size with prepare's policy
(`pipeline.images.resize`), centre-cropped to the model's input and normalised with the stored
mean/std. A file that cannot be read (missing, not an image, truncated, more pixels than the
limit) is one line on stderr; the others are still predicted, and the exit status is 1 at the end.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.data.folder import EXTENSIONS, name_problem, walk_files
from pipeline.errors import UserError
from pipeline.images import BadImage
from pipeline.preprocess import Preprocessing

EXIT_SOME_FAILED = 1
BATCH = 64  # images decoded and run at once


@dataclass(frozen=True)
class Predictor:
    classes: list[str]
    prep: Preprocessing
    logits: Callable[[np.ndarray], np.ndarray]  # stored uint8 N×3×S×S → N×K float32 (crops, normalises inside)

    @property
    def image_size(self) -> int:
        return self.prep.image_size

    @property
    def resize(self) -> str:
        return self.prep.resize


def load_predictor(path: Path) -> Predictor:
    """An ONNX model (`.onnx`) or one of our checkpoints (anything else)."""
    if not path.is_file():
        raise UserError(f"model {str(path)!r} is not a file; give models/model.onnx (dvc repro export) "
                        "or models/model.pt (dvc repro train)")
    return _onnx_predictor(path) if path.suffix.lower() == ".onnx" else _checkpoint_predictor(path)


def _checkpoint_predictor(path: Path) -> Predictor:
    from pipeline.checkpoint import calibrated, load_checkpoint, predict_logits, preprocessing

    raw, ckpt = load_checkpoint(path)
    model, prep = calibrated(raw, ckpt), preprocessing(ckpt)
    return Predictor(list(ckpt["classes"]), prep, lambda x: predict_logits(model, x, prep))


def _onnx_predictor(path: Path) -> Predictor:
    """Torch-free: ONNX Runtime, and the preprocessing on numpy arrays."""
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
        NoSuchFile,
    )

    from pipeline.export.runtime import onnx_session, read_onnx_metadata
    from pipeline.io import read_json

    try:
        sess = onnx_session(path)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as exc:
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}); re-run export") from None
    card = read_onnx_metadata(sess.get_modelmeta().custom_metadata_map)
    beside = path.with_suffix(".json")
    if card is None and beside.is_file():
        card = read_json(beside)
    if card is None:
        raise UserError(f"{path} has no classes/preprocessing in its metadata and there is no {beside.name} beside it; "
                        "export it with this pipeline (dvc repro export)")
    name = sess.get_inputs()[0].name
    prep = Preprocessing.from_dict(card)

    def logits(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: prep.model_input(x)})[0]

    return Predictor(list(card["classes"]), prep, logits)


def image_files(paths: list[Path]) -> list[Path]:
    """The files to predict: a file as given (a bad one is reported when read), a folder as its
    image files, recursively, sorted by path, as prepare scans a folder data set. Hidden files
    and other extensions in a folder are skipped with one line on stderr; a folder without
    image files is an error."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        try:
            found = walk_files(str(path))
        except OSError as exc:
            raise UserError(f"cannot list folder {str(path)!r}: {exc.strerror or exc}") from None
        images = [f for f in found if not name_problem(f)]
        skipped = [f for f in found if name_problem(f)]
        if not images:
            why = _skipped(skipped) if found else "it is empty"
            raise UserError(f"folder {str(path)!r} has no image files: {why}; predict looks for "
                            f"{', '.join(sorted(EXTENSIONS))} in it and its subfolders")
        if skipped:
            print(f"{path}: {_skipped(skipped)}", file=sys.stderr)
        files += [path / f for f in images]
    return files


def _skipped(files: list[str]) -> str:
    """'skipped 3 files (not images by extension: .csv, .txt; hidden: 1)'."""
    why = [name_problem(f) for f in files]
    other = sorted({os.path.splitext(f)[1].lower() or "no extension" for f, w in zip(files, why) if w != "hidden file"})
    parts = ([f"not images by extension: {', '.join(other)}"] if other else []) + \
            ([f"hidden: {why.count('hidden file')}"] if "hidden file" in why else [])
    return f"skipped {len(files)} file{'s' * (len(files) != 1)} ({'; '.join(parts)})"


def preprocess(path: Path, prep: Preprocessing) -> np.ndarray:
    """One image file → uint8 3×S×S at the stored size, exactly as prepare turns a folder image
    into a row of its arrays (the centre crop and normalisation follow in `Predictor.logits`)."""
    from pipeline.images import decode_image, resize

    size = prep.stored_size
    return resize(decode_image(path, size), size, prep.resize, prep.interpolation).transpose(2, 0, 1)


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Refuse images above `max_pixels` (default: Pillow's MAX_IMAGE_PIXELS, ~89 M): Pillow
    warns above the limit and refuses above twice it; here both are refusals."""
    saved = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def probabilities(predictor: Predictor, images: np.ndarray, tta: str = "none") -> np.ndarray:
    """Class probabilities of stored uint8 images: the softmax of the model's logits (calibrated
    when the model carries a temperature), averaged over the test-time-augmentation views of
    `tta` (`pipeline.preprocess.tta_views`: none, hflip, hflip_crops), as the evaluate stage's
    `evaluate.tta` averages them."""
    from pipeline.preprocess import tta_views
    from pipeline.probabilities import softmax  # the evaluate stage's own, so probabilities agree

    return np.mean([softmax(predictor.logits(v)) for v in tta_views(images, predictor.image_size, tta)], axis=0)


def predict_files(predictor: Predictor, files: list[Path], k: int, max_pixels: int | None = None,
                  tta: str = "none") -> Iterator[tuple[Path, list[tuple[str, float]] | None, str]]:
    """(file, top-k (label, probability) best first, '') per file in order, or (file, None, reason)."""

    k = min(k, len(predictor.classes))
    for start in range(0, len(files), BATCH):
        chunk, images, reasons = files[start:start + BATCH], [], {}
        with pixel_limit(max_pixels):
            for f in chunk:
                try:
                    images.append(preprocess(f, predictor.prep))
                except BadImage as exc:
                    reasons[f] = str(exc)
        probs = iter(probabilities(predictor, np.stack(images), tta) if images else [])
        for f in chunk:
            if f in reasons:
                yield f, None, reasons[f]
                continue
            p = next(probs)
            yield f, [(predictor.classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]], ""


def format_table(path: Path, top: list[tuple[str, float]]) -> str:
    width = max(5, *(len(label) for label, _ in top))
    rows = [f"{path}", f"  {'rank':>4}  {'label':<{width}}  probability"]
    rows += [f"  {i:>4}  {label:<{width}}  {p:11.4f}" for i, (label, p) in enumerate(top, 1)]
    return "\n".join(rows)


def run(model: Path, images: list[Path], top_k: int = 5, as_json: bool = False,
        max_pixels: int | None = None, tta: str = "none") -> int:
    """Print predictions for `images` (files and folders); return how many could not be read."""
    files = image_files(images)
    predictor = load_predictor(model)
    failed = 0
    for path, top, reason in predict_files(predictor, files, top_k, max_pixels, tta):
        if top is None:
            failed += 1
            sys.stdout.flush()  # keep the error next to its neighbours in a terminal
            print(f"error: {path}: {reason}", file=sys.stderr, flush=True)
        elif as_json:
            print(json.dumps({"image": str(path), "top_k": [{"label": lb, "probability": p} for lb, p in top]}))
        else:
            print(format_table(path, top) + "\n")
    return failed
