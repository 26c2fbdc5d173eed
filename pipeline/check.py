"""The check stage's work: everything about params.yaml that can be known before any data is
touched, checked in one place, and the preprocessing resolved from the weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline import paths
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.params import Params
from pipeline.models.weights import resolve_preprocessing


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_files(params: Params) -> None:
    if params.dataset == "folder" and not Path(params.data_dir).is_dir():
        raise UserError(f"data_dir={params.data_dir!r} is not a folder; point data_dir at your folder of class "
                        "folders (root/<class>/*.jpg or root/train|val|test/<class>/*.jpg)")
    if params.weights and Path(params.weights).resolve() in {p.resolve() for p in (paths.CHECKPOINT, paths.ONNX_MODEL)}:
        raise UserError(f"weights={params.weights!r} is this pipeline's own output, which the train stage replaces; "
                        f"copy it first (e.g. cp {params.weights} weights/previous.pt) and point weights at the copy")


def check(params: Params) -> dict:
    """Validate what the params point at; write the resolved preprocessing and the weights'
    hash (only after every check passed). Returns what was written."""
    check_files(params)
    prep = resolve_preprocessing(params.model, params.pretrained, params.weights, params.image_size,
                                 params.data.resize)  # reads (and so checks) the weights file
    weights = {"path": params.weights, "sha256": sha256(Path(params.weights)) if params.weights else None}
    write_json(paths.RESOLVED_PREPROCESSING, prep.to_dict())
    write_json(paths.RESOLVED_WEIGHTS, weights)
    print(f"check: params.yaml is valid; preprocessing {prep.image_size} px: {prep.reason}")
    return {"preprocessing": prep.to_dict(), "weights": weights}
