"""The check stage's work: everything about params.yaml that can be known before any data is
touched, checked in one place, and the preprocessing resolved from the weights."""
from __future__ import annotations

from pathlib import Path

from pipeline import dvcplots, paths, tracking
from pipeline.errors import UserError
from pipeline.io import file_sha256, write_json
from pipeline.models.weights import resolve_preprocessing
from pipeline.params import Params


def check_files(params: Params) -> None:
    if params.dataset == "folder" and not Path(params.data_dir).is_dir():
        raise UserError(f"data_dir={params.data_dir!r} is not a folder; point data_dir at your folder of class "
                        "folders (root/<class>/*.jpg or root/train|val|test/<class>/*.jpg)")
    if params.weights and Path(params.weights).resolve() in {p.resolve() for p in (paths.CHECKPOINT, paths.ONNX_MODEL)}:
        raise UserError(f"weights={params.weights!r} is this pipeline's own output, which the train stage replaces; "
                        f"copy it first (e.g. cp {params.weights} weights/previous.pt) and point weights at the copy")


def check_training(params: Params) -> None:
    """What the train stage would find wrong only after prepare: the device, class weights."""
    from pipeline.data.registry import class_count
    from pipeline.training.distributed import pick_device

    pick_device(params.train.device)
    weights = params.train.class_weights
    if isinstance(weights, list) and len(weights) != (k := class_count(params.dataset, Path(params.data_dir))):
        raise UserError(f"train.class_weights has {len(weights)} values but dataset={params.dataset} has {k} classes; "
                        "give one weight per class, or none / balanced")


def check(params: Params) -> dict:
    """Validate what the params point at; write the resolved preprocessing and the weights'
    hash (only after every check passed). Returns what was written."""
    check_files(params)
    check_training(params)
    tracking.enabled()  # an unusable MLflow store stops here (unless mlflow.required: false)
    prep = resolve_preprocessing(params.model, params.pretrained, params.weights, params.image_size,
                                 params.data.resize)  # reads (and so checks) the weights file
    weights = {"path": params.weights, "sha256": file_sha256(Path(params.weights)) if params.weights else None}
    write_json(paths.RESOLVED_PREPROCESSING, prep.to_dict())
    write_json(paths.RESOLVED_WEIGHTS, weights)
    dvcplots.ensure_page()  # `dvc plots show` draws offline (written once, ~1.5 s)
    print(f"check: params.yaml is valid; preprocessing {prep.image_size} px: {prep.reason}")
    return {"preprocessing": prep.to_dict(), "weights": weights}
