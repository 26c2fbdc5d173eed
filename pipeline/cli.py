"""`pipeline summary [-m NAME]`, `pipeline models [PATTERN]`, `pipeline predict [-m MODEL] IMAGE|FOLDER...`,
`pipeline lr-find`, `pipeline tune --trials N`, `pipeline ensemble MEMBER...` and `pipeline params [--write]`.

Without -m, `summary` shows params.yaml's model at the project's input size and class count,
and `predict` runs models/model.onnx (what `dvc repro` exports)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core import paths
from pipeline.core.errors import UserError, run_cli
from pipeline.core.params import EvaluateParams, TuneParams, choices


SUMMARY_IMAGE_SIZE = 32  # `pipeline summary`'s input size when neither --image-size nor data/resolved gives one
SUMMARY_NUM_CLASSES = 10  # and its head's outputs when neither --num-classes nor data/prepared gives them


def _summary(args: argparse.Namespace) -> None:
    from pipeline.models import build_model, check_model_name, min_image_size
    from pipeline.models.summary import summarize

    name, name_from = _summary_model(args.model)
    size, size_from = _summary_size(args)
    k, k_from = _summary_classes(args)
    check_model_name(name)
    if size < (need := min_image_size(name)):
        if args.image_size is not None:
            raise UserError(f"--image-size {size}: {name} needs at least {need} px")
        size, size_from = need, f"{name}'s minimum"
    print(f"summary: model {name} ({name_from}), {size} px ({size_from}), {k} classes ({k_from})")
    print(summarize(build_model(name, num_classes=k), name, size, k).table(args.depth))


def _summary_model(given: str | None) -> tuple[str, str]:
    """(model name, where it came from): -m, else params.yaml's `model`."""
    from pipeline.core.params import load_params

    if given:
        return given, "-m"
    if not paths.PARAMS.is_file():
        raise UserError(f"no -m/--model given and no {paths.PARAMS} here to take the model from; "
                        "give one (e.g. -m resnet18) or run in the repository root")
    return load_params(check_models=False).model, str(paths.PARAMS)


def _summary_size(args: argparse.Namespace) -> tuple[int, str]:
    """(input size, where it came from): --image-size, else the resolved preprocessing's, else 32."""
    if args.image_size is not None:
        return args.image_size, "--image-size"
    if resolved := _json_if_there(paths.RESOLVED_PREPROCESSING, "check"):
        return int(resolved["image_size"]), str(paths.RESOLVED_PREPROCESSING)
    return SUMMARY_IMAGE_SIZE, "default"


def _summary_classes(args: argparse.Namespace) -> tuple[int, str]:
    """(classes, where they came from): --num-classes, else the prepared data's, else 10."""
    if args.num_classes is not None:
        return args.num_classes, "--num-classes"
    if (meta := _json_if_there(paths.PREPARED_META, "prepare")) and meta.get("classes"):
        return len(meta["classes"]), str(paths.PREPARED_DIR)
    return SUMMARY_NUM_CLASSES, "default"


def _json_if_there(path: Path, stage: str) -> dict | None:
    from pipeline.core.io import read_json

    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON); re-make it: dvc repro -f {stage}") from None


COUNT_LIMIT = 100  # `pipeline models` counts parameters when at most this many names match (~50 ms each)


def _models(args: argparse.Namespace) -> None:
    from pipeline.models import REGISTRY, count_parameters, has_pretrained_weights, list_models

    names = list_models(args.pattern)
    counted = len(names) <= COUNT_LIMIT
    width = max([len(n) for n in names] + [4]) + 2
    print(f"{'name':<{width}}{'params' if counted else '':>9}  pretrained")
    for name in names:
        params = _millions(_count_or_none(count_parameters, name, args.num_classes)) if counted else ""
        about = REGISTRY[name].description if name in REGISTRY else ""
        print(f"{name:<{width}}{params:>9}  {'yes' if has_pretrained_weights(name) else 'no':<10}  {about}".rstrip())
    print(f"{len(names)} models" + (f" matching {args.pattern!r}" if args.pattern else "")
          + " (ours, then timm's; any of them works as `model:` in params.yaml)")
    print(f"params: with a {args.num_classes}-class head (--num-classes)" if counted else
          f"params: counted when at most {COUNT_LIMIT} models match; give a pattern, e.g. 'resnet*'")
    print("pretrained: weights that `pretrained: true` downloads (timm's hub; torchvision for alexnet)")


def _count_or_none(count, name: str, num_classes: int) -> int | None:
    try:
        return count(name, num_classes)
    except (RuntimeError, NotImplementedError):  # a model that cannot be built on the meta device: shown as '?'
        return None


def _millions(n: int | None) -> str:
    """11689512 → '11.7 M', 289_000 → '0.289 M', 1_843_000_000 → '1,843 M'."""
    if n is None:
        return "?"
    m = n / 1e6
    return f"{m:,.0f} M" if m >= 100 else f"{m:.1f} M" if m >= 10 else f"{m:.2f} M" if m >= 1 else f"{m:.3f} M"


def _predict(args: argparse.Namespace) -> None:
    from pipeline.export.predict import EXIT_SOME_FAILED, model_and_images, run

    model, images = model_and_images(args.model, args.images)
    if run(model, images, args.top_k, args.json, args.max_pixels, args.tta, args.out, args.alpha, args.abstain):
        sys.exit(EXIT_SOME_FAILED)


def _lr_find(args: argparse.Namespace) -> None:
    from pipeline.core.params import load_params
    from pipeline.training.distributed import pick_device
    from pipeline.training.lr import find_lr, plot

    params = load_params()
    lrs, losses, best, what = find_lr(params, pick_device(params.train.device), args.steps)
    plot(lrs, losses, best, args.out, f"Learning-rate range test ({what})")
    print(f"lr-find: {len(lrs)} steps from {lrs[0]:.1e} to {lrs[-1]:.1e}; the loss falls fastest at lr {best:.2g} "
          f"(try -S lr={best:.2g}); curve: {args.out}")


def _tune(args: argparse.Namespace) -> None:
    from pipeline.tune import tune

    tune(args.trials, args.jobs, args.sampler, args.set, args.apply)


def _ensemble(args: argparse.Namespace) -> None:
    from pipeline.ensemble import ENSEMBLE_ONNX, run

    run(args.members, args.weights, args.out or ENSEMBLE_ONNX)


def _runs(args: argparse.Namespace) -> None:
    from pipeline.runs import show

    show(args.n, args.json)


def _params(args: argparse.Namespace) -> None:
    from pipeline.core.io import atomic_path
    from pipeline.params_doc import render_params_yaml

    if not args.write:
        print(render_params_yaml(), end="")
        return
    with atomic_path(paths.PARAMS) as tmp:
        tmp.write_text(render_params_yaml())
    print(f"params: wrote {paths.PARAMS}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pipeline", description="Tools around the image-classification pipeline.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="layer table, parameter counts and MACs/FLOPs of a model",
                       description="The layers of a model (output shapes, parameters with their children's), its "
                                   "parameter count and MACs per image. Without options: the model of params.yaml "
                                   "at the project's input size and class count; the first line says where each "
                                   "value came from.")
    s.add_argument("-m", "--model", default=None,
                   help="a registry or timm model name, e.g. resnet18 (default: `model` of params.yaml)")
    s.add_argument("--image-size", type=_positive, default=None,
                   help=f"input height and width in pixels (default: image_size of {paths.RESOLVED_PREPROCESSING} "
                        f"when the check stage has run, else {SUMMARY_IMAGE_SIZE} or the model's minimum)")
    s.add_argument("--num-classes", type=_positive, default=None,
                   help=f"outputs of the head (default: the classes of {paths.PREPARED_META} when prepare "
                        f"has run, else {SUMMARY_NUM_CLASSES})")
    s.add_argument("--depth", type=int, default=2, help="module nesting shown in the table (default 2)")
    s.set_defaults(fn=_summary)
    m = sub.add_parser("models", help="list the model names with parameter counts and pretrained weights",
                       description="List our models and timm's matching PATTERN: parameters (counted from the "
                                   f"structure, when at most {COUNT_LIMIT} names match), whether pretrained weights "
                                   "exist for `pretrained: true`, and our models' notes.")
    m.add_argument("pattern", nargs="?", default="", help="glob pattern, e.g. 'efficientnet*'")
    m.add_argument("--num-classes", type=_positive, default=1000,
                   help="outputs of the head the parameter counts assume (default 1000, ImageNet's)")
    m.set_defaults(fn=_models)
    p = sub.add_parser("predict", help=f"classes of image files or folders, with {paths.ONNX_MODEL} or a given model",
                       description="Predict image files with the evaluation preprocessing (RGB, prepare's resize, "
                                   "the model's mean/std). A folder stands for its image files (recursively, sorted; "
                                   "hidden files and other extensions skipped, counted on stderr). One image: its "
                                   "top-k table. Several: a progress bar on stderr (in a terminal), one line per "
                                   "image (class, probability, the next classes), then per class the images "
                                   "predicted as it and their mean probability; for images in class-named folders "
                                   "(photos/<class>/x.jpg, photos/test/<class>/x.jpg) the accuracy against them. "
                                   "Unreadable files are reported on stderr, one line each; the others are still "
                                   "predicted and the exit status is 1. A .onnx model runs on ONNX Runtime without "
                                   "importing torch. A multi-label model (task: multilabel) gives each image its label "
                                   "set: the labels whose probability reaches the threshold chosen for them.")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE|FOLDER",
                   help="image files of any size and mode, or folders of them (the older form `predict "
                        "MODEL.onnx|MODEL.pt IMAGE...` also works)")
    p.add_argument("-m", "--model", type=Path, default=None,
                   help=f"an exported model (.onnx) or a checkpoint (models/model.pt); default {paths.ONNX_MODEL}, "
                        "which `dvc repro export` writes")
    p.add_argument("-k", "--top-k", type=_positive, default=None,
                   help="classes shown per image (default 5; 3 on the one-line-per-image table of several images); "
                        "multi-label: also the k most probable labels beside each set (default: the set alone)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.csv",
                   help="also write one row per image: image, predicted, probability, label (its class folder, "
                        "if any), error, and p_<class> for every class (multi-label: image, labels joined by ';', "
                        "error, p_<label>); an unreadable image gets a row with empty prediction and probabilities "
                        "and its reason in `error`")
    p.add_argument("--json", action="store_true",
                   help='one JSON object per line: {"image": ..., "top_k": [{"label": ..., "probability": ...}]}; '
                        'multi-label: {"image": ..., "labels": [...], "scores": [{"label", "probability", "threshold"}]}')
    p.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="the prediction sets' level: each image's set of classes holds the true one with probability "
                        "≥ 1 − A (default: the ONNX model's card, as export wrote it from evaluate.conformal_alpha; for "
                        "a checkpoint, params.yaml's default); 0: no sets")
    p.add_argument("--abstain", action="store_true",
                   help="answer 'unsure' (naming the candidates) for an image whose prediction set holds more than "
                        "one class, instead of its most probable class")
    p.add_argument("--max-pixels", type=_positive, default=None,
                   help="refuse larger images as decompression bombs (default: Pillow's limit, 89,478,485)")
    p.add_argument("--tta", choices=choices(EvaluateParams, "tta"), default="none",
                   help="test-time augmentation: average the probabilities of the image and its mirror (hflip, 2x "
                        "the time) or of 5 crops and their mirrors (hflip_crops, 10x); default none")
    p.set_defaults(fn=_predict)
    lf = sub.add_parser("lr-find", help="the learning-rate range test on the prepared data, drawn",
                        description="Train for up to --steps batches while the learning rate grows exponentially "
                                    "(1e-6 to 1), with the model, weights, optimizer and augmentation of params.yaml; "
                                    "draw the smoothed loss against the lr and suggest where it falls fastest. Needs "
                                    "data/prepared (dvc repro prepare).")
    lf.add_argument("--steps", type=_positive, default=100, help="batches to try (default 100)")
    lf.add_argument("--out", type=Path, default=paths.LR_FIND_PNG, help=f"the picture (default {paths.LR_FIND_PNG})")
    lf.set_defaults(fn=_lr_find)
    t = sub.add_parser("tune", help="hyperparameter search over params.yaml's tune.space, each trial a DVC experiment",
                       description="Search tune.space of params.yaml with Optuna. Every trial is a DVC experiment "
                                   "(dvc exp show / dvc exp apply) and an MLflow run under the study's parent run; "
                                   "the objective is a validation figure (or cross-validation's mean), never the "
                                   "test split. Re-running with the same study resumes it (--trials is the total).")
    t.add_argument("--trials", type=_positive, required=True, help="finished trials the study should have")
    t.add_argument("--jobs", type=_positive, default=1, help="trials run at once, by DVC queue workers (default 1)")
    t.add_argument("--sampler", choices=choices(TuneParams, "sampler"), default=None,
                   help="default: tune.sampler of params.yaml")
    t.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a params.yaml value for every trial, e.g. -S epochs=5 (repeatable)")
    t.add_argument("--apply", action="store_true", help="write the best trial's values into params.yaml")
    t.set_defaults(fn=_tune)
    e = sub.add_parser("ensemble", help="a weighted ensemble of experiments or checkpoints, scored and exported to ONNX",
                       description="Average the members' calibrated probabilities softmax(logits / T) with weights "
                                   "given or fitted on the val split (least log loss); score the ensemble and each "
                                   "member on the test split of data/prepared (metrics/ensemble.json) and export one "
                                   "ONNX model that `pipeline predict` runs, with its card beside it. Members must "
                                   "share classes and input size, and have been trained on this data/prepared.")
    e.add_argument("members", nargs="+", metavar="MEMBER",
                   help="a DVC experiment name (dvc exp list --all-commits) or a checkpoint file (models/model.pt)")
    e.add_argument("--weights", default="auto", metavar="auto|W1,W2,...",
                   help="auto: fitted on the val split (default); or one non-negative number per member, normalised")
    e.add_argument("--out", type=Path, default=None,
                   help="the ONNX model (default models/ensemble.onnx); its card is written beside it as .json")
    e.set_defaults(fn=_ensemble)
    r = sub.add_parser("runs", help="every experiment on one screen: best test accuracy first, what differed",
                       description="Every DVC experiment of the repository (of every baseline commit), the "
                                   "baselines and the workspace, grouped by data set, best test accuracy first "
                                   "(* marks the best of each): model, strategy, test and best validation "
                                   "accuracy, training time (from MLflow) and the params that differ among them.")
    r.add_argument("-n", type=_positive, default=None, metavar="N", help="the N best rows of each data set")
    r.add_argument("--json", action="store_true", help="the rows as a JSON list, for scripts")
    r.set_defaults(fn=_runs)
    pa = sub.add_parser("params", help="params.yaml as pipeline/core/params.py defines it: each key, default and comment",
                        description="Render params.yaml from the params model of pipeline/core/params.py, where each "
                                    "key's default, bounds and comment are written: print it, or write it with "
                                    "--write (values changed in params.yaml since are replaced by the defaults).")
    pa.add_argument("--write", action="store_true", help=f"replace {paths.PARAMS} instead of printing")
    pa.set_defaults(fn=_params)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_cli(lambda: args.fn(args))
