"""The check stage's work: everything about params.yaml that can be known before any data is
touched, checked in one place, and the preprocessing resolved from the weights."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline import dvcplots, mlstore

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import file_sha256, write_json
from pipeline.core.params import Params
from pipeline.models.weights import resolve_preprocessing


def check_files(params: Params) -> None:
    """The files the params point at. dataset=folder: the folder is listed (not read) and refused
    for what prepare would refuse only after DVC removed its outputs: no class folders, fewer
    than 2 with files, a class folder with no image, a link loop (`pipeline.data.folder.scan`), a
    data.group_by that matches no image's path."""
    if params.dataset == "folder":
        if not Path(params.data_dir).is_dir():
            raise UserError(f"data_dir={params.data_dir!r} is not a folder; point data_dir at your folder of class "
                            "folders (root/<class>/*.jpg or root/train|val|test/<class>/*.jpg)")
        from pipeline.data.folder import list_class_folders, scan

        if params.task == "multilabel":
            from pipeline.data.labels_csv import read_table

            rels = [r for r in read_table(Path(params.data_dir), params.data.labels_csv)["path"].str.strip() if r]
        else:
            scan(Path(params.data_dir))
            rels = [rel for *_, files in list_class_folders(Path(params.data_dir)) for rel, problem in files
                    if not problem]
        if params.data.group_by:  # a pattern that matches no path: refused here, not after DVC removed the outputs
            from pipeline.data.groups import path_groups

            path_groups(rels, params.data.group_by)
    if params.weights and Path(params.weights).resolve() in {p.resolve() for p in (paths.CHECKPOINT, paths.ONNX_MODEL)}:
        raise UserError(f"weights={params.weights!r} is this pipeline's own output, which the train stage replaces; "
                        f"copy it first (e.g. cp {params.weights} weights/previous.pt) and point weights at the copy")


def check_training(params: Params, k: int) -> None:
    """What the train stage would find wrong only after prepare: the device, class weights (the
    data set has `k` classes)."""
    from pipeline.training.distributed import pick_device

    pick_device(params.train.device)
    weights = params.train.class_weights
    if isinstance(weights, list) and len(weights) != k:
        raise UserError(f"train.class_weights has {len(weights)} values but dataset={params.dataset} has {k} classes; "
                        "give one weight per class, or none / balanced")


def check_model(params: Params, image_size: int, k: int) -> None:
    """The model builds with these options and a `k`-class head and takes `image_size` px (on
    the meta device: no memory, ~0.2 s), and `pretrained: true` has its weights here
    (`fetch_pretrained`)."""
    from pipeline.models.registry import arch_kwargs, build_problem
    from pipeline.models.weights import fetch_pretrained

    kwargs = arch_kwargs(params.model, k, image_size, params.train.dropout, params.train.drop_path)
    if problem := build_problem(params.model, image_size, kwargs):
        raise UserError(f"model={params.model!r} {problem}; change model, image_size or the train.dropout / "
                        "train.drop_path options")
    if params.pretrained and not params.weights:
        print(f"check: ImageNet weights of {params.model}: {fetch_pretrained(params.model)}", flush=True)


def link_weights(weights: str | None, link: Path = paths.RESOLVED_WEIGHTS) -> None:
    """`link`: a symbolic link to the weights file, or a one-line file saying there are none. DVC
    hashes what a link points to, so when the file's bytes change (same path, same params) the
    train stage, which depends on the link, re-runs, and so does this stage (its output
    changed): no stage has to run on every `dvc repro` to notice."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    if weights:
        tmp.symlink_to(Path(weights).resolve())
    else:
        tmp.write_text("no weights file: weights: null in params.yaml\n")  # not empty: DVC warns of empty deps
    os.replace(tmp, link)


def check(params: Params) -> dict:
    """Validate what the params point at; write the resolved preprocessing and the link to the
    weights (only after every check passed). Returns what was written."""
    from pipeline.data.registry import class_count

    check_files(params)
    k = class_count(params.dataset, Path(params.data_dir), params.data if params.task == "multilabel" else None)
    if k < 2:  # prepare would refuse it only after DVC removed its outputs
        raise UserError(f"{Path(params.data_dir) / params.data.labels_csv} names {k} label(s); task=multilabel needs at "
                        "least 2 (labels joined by data.label_separator="
                        f"{params.data.label_separator!r})")
    check_training(params, k)
    mlstore.usable(params.mlflow.required, params.experiment_name())  # an unusable store stops here
    prep = resolve_preprocessing(params.model, params.pretrained, params.weights, params.image_size,
                                 params.data.resize)  # reads (and so checks) the weights file
    check_model(params, prep.image_size, k)
    weights = {"path": params.weights, "sha256": file_sha256(Path(params.weights)) if params.weights else None}
    write_json(paths.RESOLVED_PREPROCESSING, prep.to_dict())
    link_weights(params.weights)
    dvcplots.ensure_page()  # `dvc plots show` draws offline (written once, ~1.5 s)
    print(f"check: params.yaml is valid; preprocessing {prep.image_size} px: {prep.reason}")
    return {"preprocessing": prep.to_dict(), "weights": weights}
