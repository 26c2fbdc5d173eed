"""`pipeline predict [-m MODEL] IMAGE|FOLDER... [--out FILE.csv]`: the classes of image files.

MODEL (default models/model.onnx, which `dvc repro export` writes; the older form `predict
MODEL.onnx|MODEL.pt IMAGE...` still works) is an exported ONNX model (classes and preprocessing
read from its metadata, or from the JSON beside it; run by ONNX Runtime without importing torch)
or a checkpoint (models/model.pt). A FOLDER stands for its image files, found recursively and
sorted by path as prepare scans a folder data set (`pipeline.data.folder`); hidden files and
other extensions are skipped and counted on stderr. Every image goes through exactly the
evaluation preprocessing (the model's `Preprocessing`, on a numpy array for ONNX, on a tensor for
the checkpoint: the same values): decoded to RGB as prepare decodes a folder data set
(`pipeline.core.images.decode_image`: EXIF rotation, alpha on white, 16-bit scaled), resized to the
stored size with prepare's policy (`pipeline.core.images.resize`), centre-cropped to the model's input
and normalised with the stored mean/std.

One image file: its top-k table. Several, or a folder: a progress bar on stderr (only when stderr
is a terminal), one aligned line per image on stdout (path, top-1 class and probability, the next
classes), then a summary: images predicted as each class with their mean probability, how many
were predicted and how many failed, and, for images in class-named folders (root/<class>/x.jpg,
root/test/<class>/x.jpg: the folder's name is one of the model's classes), the accuracy against
those folder labels. `--json`: one JSON object per line and nothing else on stdout. `--out
FILE.csv`: one row per image with every class's probability. A file that cannot be read (missing,
not an image, truncated, more pixels than the limit) is one line on stderr; the others are still
predicted, and the exit status is 1 at the end.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.images import BadImage
from pipeline.core.preprocess import Preprocessing
from pipeline.data.folder import EXTENSIONS, name_problem, walk_files

EXIT_SOME_FAILED = 1
BATCH = 64  # images decoded and run at once
MODEL_SUFFIXES = (".onnx", ".pt", ".pth")  # a first IMAGE ending so is the model: `predict MODEL IMAGE...`
TOP_K = 5  # classes shown for one image and in --json
ROW_TOP_K = 3  # classes on each line of the table of several images: the top-1 and the next two
PATH_WIDTH = 60  # the table's path column: wider paths push their own line out of line


@dataclass(frozen=True)
class Predictor:
    classes: list[str]
    prep: Preprocessing
    logits: Callable[[np.ndarray], np.ndarray]  # stored uint8 N×3×S×S → N×K float32 (crops, normalises inside)
    thresholds: np.ndarray | None = None  # task=multilabel: each label's threshold on its sigmoid; None: softmax
    sets: tuple[float, float] | None = None  # (α, q̂) of the prediction sets (pipeline.conformal); None: no sets

    def prediction_set(self, p: np.ndarray) -> list[str] | None:
        """The classes of this image's prediction set, most probable first; None without sets."""
        if self.sets is None:
            return None
        from pipeline.conformal import prediction_sets

        keep = prediction_sets(p[None], self.sets[1])[0]
        return [self.classes[i] for i in np.argsort(-p, kind="stable") if keep[i]]

    @property
    def image_size(self) -> int:
        return self.prep.image_size

    @property
    def resize(self) -> str:
        return self.prep.resize


def model_and_images(model: Path | None, images: list[Path]) -> tuple[Path, list[Path]]:
    """The model to run and the images to predict: `--model`, else a first IMAGE ending in .onnx
    or .pt (the older form `predict MODEL IMAGE...`), else models/model.onnx, which must exist."""
    if model is None and images and images[0].suffix.lower() in MODEL_SUFFIXES:
        model, images = images[0], images[1:]
    if stray := [p for p in images if p.suffix.lower() in MODEL_SUFFIXES]:
        raise UserError(f"{stray[0]} looks like a model, not an image; give one model, first or with -m/--model")
    if not images:
        raise UserError(f"no images to predict with {model}; give image files or folders after it")
    if model is None and not paths.ONNX_MODEL.is_file():
        raise UserError(f"no --model given and the default {paths.ONNX_MODEL} does not exist here; make it with "
                        "`dvc repro export` (`dvc repro` runs the whole pipeline), or pass --model models/model.pt")
    return model or paths.ONNX_MODEL, images


def load_predictor(path: Path, alpha: float | None = None) -> Predictor:
    """An ONNX model (`.onnx`) or one of our checkpoints (anything else); `alpha`: the level of
    its prediction sets (None: the ONNX card's, or for a checkpoint params' default; 0: none)."""
    if not path.is_file():
        raise UserError(f"model {str(path)!r} is not a file; give models/model.onnx (dvc repro export) "
                        "or models/model.pt (dvc repro train)")
    if alpha is not None and not 0 <= alpha < 1:
        raise UserError(f"--alpha {alpha:g}: give a level in [0, 1), e.g. 0.1 for sets that hold the true class "
                        "90 % of the time (0: no sets)")
    return _onnx_predictor(path, alpha) if path.suffix.lower() == ".onnx" else _checkpoint_predictor(path, alpha)


def _checkpoint_predictor(path: Path, alpha: float | None) -> Predictor:
    from pipeline.checkpoint import calibrated, conformal_threshold, load_checkpoint, predict_logits, preprocessing
    from pipeline.core.params import EvaluateParams

    raw, ckpt = load_checkpoint(path)
    model, prep = calibrated(raw, ckpt), preprocessing(ckpt)
    alpha = EvaluateParams().conformal_alpha if alpha is None else alpha
    qhat = conformal_threshold(ckpt, alpha)
    return Predictor(list(ckpt["classes"]), prep, lambda x: predict_logits(model, x, prep), _thresholds(ckpt),
                     None if qhat is None else (alpha, min(qhat, 1.0)))


def _thresholds(card: dict) -> np.ndarray | None:
    """A multi-label model's thresholds (its checkpoint or model card says task: multilabel)."""
    return np.asarray(card["thresholds"], dtype=np.float64) if card.get("task") == "multilabel" else None


def _onnx_predictor(path: Path, alpha: float | None) -> Predictor:
    """Torch-free: ONNX Runtime, and the preprocessing on numpy arrays."""
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
        NoSuchFile,
    )

    from pipeline.export.runtime import onnx_session, read_onnx_metadata
    from pipeline.core.io import read_json

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

    return Predictor(list(card["classes"]), prep, logits, _thresholds(card), _card_sets(card, alpha))


def _card_sets(card: dict, alpha: float | None) -> tuple[float, float] | None:
    """The card's prediction sets, when it has them and `alpha` (if given) is theirs."""
    if "conformal_threshold" not in card or alpha == 0:
        return None
    if alpha is not None and alpha != card["conformal_alpha"]:
        raise UserError(f"--alpha {alpha:g}: this ONNX model's sets are calibrated at α = {card['conformal_alpha']:g} "
                        "(evaluate.conformal_alpha at export); re-export at another level, or pass the checkpoint "
                        "(-m models/model.pt), which holds what any level needs")
    return float(card["conformal_alpha"]), float(card["conformal_threshold"])


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
    from pipeline.core.images import decode_image, resize

    size = prep.stored_size
    return resize(decode_image(path, size), size, prep.resize, prep.interpolation).transpose(2, 0, 1)


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Images above `max_pixels` (default: Pillow's MAX_IMAGE_PIXELS, ~89 M) are refused by
    `decode_image`, as prepare refuses them; this sets the limit while predict reads."""
    saved = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def probabilities(predictor: Predictor, images: np.ndarray, tta: str = "none") -> np.ndarray:
    """Class probabilities of stored uint8 images: the softmax of the model's logits (calibrated
    when the model carries a temperature), averaged over the test-time-augmentation views of
    `tta` (`pipeline.core.preprocess.tta_views`: none, hflip, hflip_crops), as the evaluate stage's
    `evaluate.tta` averages them."""
    from pipeline.core.preprocess import tta_views
    from pipeline.probabilities import sigmoid, softmax  # the evaluate stage's own, so probabilities agree

    link = softmax if predictor.thresholds is None else sigmoid  # multi-label: a probability per label
    return np.mean([link(predictor.logits(v)) for v in tta_views(images, predictor.image_size, tta)], axis=0)


def predict_probabilities(predictor: Predictor, files: list[Path], max_pixels: int | None = None, tta: str = "none",
                          tick: Callable[[], object] | None = None) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """(file, its class probabilities, '') per file in order, or (file, None, reason); `tick()`
    after each file is read (a progress bar's update)."""
    for start in range(0, len(files), BATCH):
        chunk, images, reasons = files[start:start + BATCH], [], {}
        with pixel_limit(max_pixels):
            for f in chunk:
                try:
                    images.append(preprocess(f, predictor.prep))
                except BadImage as exc:
                    reasons[f] = str(exc)
                if tick:
                    tick()
        probs = iter(probabilities(predictor, np.stack(images), tta) if images else [])
        for f in chunk:
            yield (f, None, reasons[f]) if f in reasons else (f, next(probs), "")


def top_k(classes: list[str], p: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The k most probable (label, probability), best first (ties: the earlier class)."""
    return [(classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:k]]


def predict_files(predictor: Predictor, files: list[Path], k: int, max_pixels: int | None = None,
                  tta: str = "none") -> Iterator[tuple[Path, list[tuple[str, float]] | None, str]]:
    """(file, top-k (label, probability) best first, '') per file in order, or (file, None, reason)."""
    k = min(k, len(predictor.classes))
    for f, p, reason in predict_probabilities(predictor, files, max_pixels, tta):
        yield f, None if p is None else top_k(predictor.classes, p, k), reason


def folder_label(path: Path, classes: list[str]) -> str | None:
    """The class an image's folder names (root/<class>/x.jpg, root/test/<class>/x.jpg), if any."""
    return path.parent.name if path.parent.name in classes else None


def format_table(path: Path, top: list[tuple[str, float]], answer: Answer | None = None) -> str:
    """One image: its top-k as a ranked table under its path; its prediction set below."""
    width = max(5, *(len(label) for label, _ in top))
    rows = [f"{path}", f"  {'rank':>4}  {'label':<{width}}  probability"]
    rows += [f"  {i:>4}  {label:<{width}}  {p:11.4f}" for i, (label, p) in enumerate(top, 1)]
    if answer is not None and answer.set is not None:
        rows.append(f"  set at α = {answer.alpha:g} (holds the true class {1 - answer.alpha:.0%} of the time): "
                    + ", ".join(answer.set) + ("  → unsure" if answer.unsure else ""))
    return "\n".join(rows)


@dataclass(frozen=True)
class Answer:
    """An image's prediction set (None without sets) and whether the model abstains on it."""
    set: list[str] | None
    alpha: float = 0.0
    unsure: bool = False  # --abstain and more than one class in the set

    @classmethod
    def of(cls, predictor: Predictor, p: np.ndarray, abstain: bool) -> "Answer":
        chosen = predictor.prediction_set(p)
        alpha = predictor.sets[0] if predictor.sets else 0.0
        return cls(chosen, alpha, bool(abstain and chosen is not None and len(chosen) > 1))


@dataclass(frozen=True)
class Rows:
    """Several images: one aligned line each, `path  class  probability  next 0.05  other 0.01`,
    ending `(folder: <class>)` where the image's class folder says otherwise."""
    path_width: int
    label_width: int

    @classmethod
    def fit(cls, files: list[Path], classes: list[str]) -> "Rows":
        return cls(min(PATH_WIDTH, max(len(str(f)) for f in files)), min(24, max(5, *map(len, classes))))

    def header(self) -> str:
        return f"{'image':<{self.path_width}}  {'class':<{self.label_width}}  {'prob':>5}  next"

    def line(self, path: Path, top: list[tuple[str, float]], label: str | None, answer: Answer | None = None) -> str:
        (best, p), others = top[0], "  ".join(f"{c} {q:.2f}" for c, q in top[1:])
        wrong = f"  (folder: {label})" if label is not None and label != best else ""
        shown = "unsure" if answer is not None and answer.unsure else best
        sets = f"  set: {' | '.join(answer.set)}" if answer is not None and answer.set and len(answer.set) > 1 else ""
        return f"{str(path):<{self.path_width}}  {shown:<{self.label_width}}  {p:5.3f}  {others}{wrong}{sets}".rstrip()


@dataclass
class Tally:
    """What the summary counts: per predicted image its class, probability and folder label."""
    classes: list[str]
    predicted: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # the class folder's index, -1 outside class folders
    failed: int = 0
    set_sizes: list[int] = field(default_factory=list)  # each image's prediction set, when there are sets
    unsure: int = 0   # --abstain: images answered "unsure"

    def add(self, p: np.ndarray | None, label: str | None) -> None:
        if p is None:
            self.failed += 1
            return
        self.predicted.append(i := int(np.argmax(p)))
        self.confidence.append(float(p[i]))
        self.labels.append(-1 if label is None else self.classes.index(label))


def summary(t: Tally, model: Path, seconds: float) -> str:
    """Per class (predicted or labelled at least once) the images predicted as it and their mean
    probability, with labels also the images in its folder and how many of them were right; then
    the counts and the accuracy against the folder labels."""
    pred, conf, lab = np.array(t.predicted, int), np.array(t.confidence), np.array(t.labels, int)
    shown = [c for c in range(len(t.classes)) if (pred == c).any() or (lab == c).any()]
    width, labelled = max([5] + [len(t.classes[c]) for c in shown]), lab >= 0
    lines = [f"{'class':<{width}}  predicted  mean prob" + ("  in folder  right" if labelled.any() else "")]
    for c in shown:
        mean = f"{conf[pred == c].mean():9.3f}" if (pred == c).any() else f"{'-':>9}"
        tail = f"  {(lab == c).sum():>9}  {((lab == c) & (pred == c)).sum():>5}" if labelled.any() else ""
        lines.append(f"{t.classes[c]:<{width}}  {(pred == c).sum():>9}  {mean}{tail}")
    lines.append(f"{len(pred) + t.failed} images: {len(pred)} predicted, {t.failed} failed"
                 f"{' (on stderr)' if t.failed else ''}; model {model}, {seconds:.1f} s")
    if labelled.any():
        right, n = int((pred == lab)[labelled].sum()), int(labelled.sum())
        outside = f"; {len(pred) - n} not in a class folder" if n < len(pred) else ""
        lines.append(f"accuracy against the class folders: {right / n:.1%} ({right} of {n} right, {n - right} wrong"
                     f"{outside})")
    if t.set_sizes:
        sizes = np.array(t.set_sizes)
        lines.append(f"prediction sets: mean size {sizes.mean():.2f}, one class for {(sizes == 1).mean():.0%} of the images"
                     + (f"; {t.unsure} answered unsure (--abstain)" if t.unsure else ""))
    return "\n".join(lines)


def write_csv(out: Path, results: list[tuple[Path, np.ndarray | None, str | None, str]], classes: list[str],
              answers: list[Answer | None] | None = None) -> None:
    """One row per image: image, predicted, probability, label (its class folder), error (with sets
    also `set`, its classes by ';', and `unsure`), p_<class>...; an unreadable image has an empty
    prediction and probabilities, and its reason in `error`."""
    import pandas as pd

    from pipeline.core.io import atomic_path

    rows = [{"image": str(f), "predicted": "" if p is None else classes[int(np.argmax(p))],
             "probability": np.nan if p is None else float(np.max(p)), "label": label or "", "error": reason}
            for f, p, label, reason in results]
    if answers and any(a is not None and a.set is not None for a in answers):
        for row, a in zip(rows, answers):
            row |= {"set": ";".join(a.set) if a is not None else "", "unsure": bool(a is not None and a.unsure)}
    probs = np.stack([np.full(len(classes), np.nan) if p is None else p for _, p, _, _ in results])
    frame = pd.concat([pd.DataFrame(rows), pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])], axis=1)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)


@contextmanager
def progress_bar(total: int, wanted: bool) -> Iterator[object | None]:
    """tqdm's bar on stderr counting the images read, when `wanted` and stderr is a terminal (else
    None); lines printed meanwhile go through its `write`, above it. It is gone once done."""
    if not wanted:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="predict", unit="img", file=sys.stderr, leave=False, disable=None) as bar:
        yield None if bar.disable else bar


def say(line: str, bar: object | None, file=None) -> None:
    """Print a line (to stdout by default), above the progress bar when there is one."""
    if bar is not None:
        bar.write(line, file=file or sys.stdout)
    else:
        print(line, file=file or sys.stdout)


def check_out(out: Path | None) -> None:
    if out is not None and (out.suffix.lower() != ".csv" or out.is_dir()):
        raise UserError(f"--out {out}: give a .csv file to write, e.g. --out predictions.csv")


def run(model: Path, images: list[Path], k: int | None = None, as_json: bool = False, max_pixels: int | None = None,
        tta: str = "none", out: Path | None = None, alpha: float | None = None, abstain: bool = False) -> int:
    """Print predictions for `images` (files and folders): a table and a summary when there are
    several; write `out` (CSV) when given; return how many could not be read. `alpha`: the
    prediction sets' level (None: the model's); `abstain`: "unsure" where a set has several classes."""
    check_out(out)
    files = image_files(images)
    predictor, started = load_predictor(model, alpha), time.perf_counter()
    if abstain and predictor.sets is None and predictor.thresholds is None:
        raise UserError(f"--abstain answers unsure where the prediction set holds several classes, but {model} has no "
                        "sets (α 0, or a model made before them): give --alpha 0.1 with models/model.pt, or re-export")
    if predictor.thresholds is not None:
        from pipeline.export import predict_sets

        return predict_sets.run(predictor, model, files, images, k, as_json, max_pixels, tta, out, started)
    several = len(files) > 1 or any(p.is_dir() for p in images)
    rows = Rows.fit(files, predictor.classes) if several and not as_json else None
    k = min(k or (ROW_TOP_K if rows else TOP_K), len(predictor.classes))
    tally, results, answers = Tally(predictor.classes), [], []
    if rows:
        print(rows.header())
    with progress_bar(len(files), several) as bar:
        for path, p, reason in predict_probabilities(predictor, files, max_pixels, tta, bar and bar.update):
            label = folder_label(path, predictor.classes)
            tally.add(p, label)
            answer = None if p is None else Answer.of(predictor, p, abstain)
            if answer is not None and answer.set is not None:
                tally.set_sizes.append(len(answer.set))
                tally.unsure += answer.unsure
            results += [(path, p, label, reason)] if out else []
            answers += [answer] if out else []
            if p is None:
                sys.stdout.flush()  # keep the error next to its neighbours in a terminal
                say(f"error: {path}: {reason}", bar, sys.stderr)
            else:
                say(display(path, top_k(predictor.classes, p, k), label, as_json, rows, answer), bar)
    if rows:
        print("\n" + summary(tally, model, time.perf_counter() - started))
    if out:
        write_csv(out, results, predictor.classes, answers)
        print(f"predict: wrote {out} ({len(results)} rows, one per image)", file=sys.stderr)
    return tally.failed


def display(path: Path, top: list[tuple[str, float]], label: str | None, as_json: bool, rows: Rows | None,
            answer: Answer | None = None) -> str:
    """One image's output: a JSON line, a line of the table of several images, or its own table."""
    if as_json:
        line = {"image": str(path), "top_k": [{"label": lb, "probability": q} for lb, q in top]}
        if answer is not None and answer.set is not None:
            line |= {"set": answer.set, "alpha": answer.alpha, "answer": "unsure" if answer.unsure else top[0][0]}
        return json.dumps(line)
    return rows.line(path, top, label, answer) if rows else format_table(path, top, answer)
