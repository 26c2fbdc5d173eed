"""`pipeline summary -m NAME` and `pipeline models [PATTERN]`."""
from __future__ import annotations

import argparse

from pipeline.errors import UserError, run_cli


def _summary(args: argparse.Namespace) -> None:
    from pipeline.models import build_model, check_model_name, min_image_size
    from pipeline.summary import summarize

    check_model_name(args.model)
    if args.image_size < (need := min_image_size(args.model)):
        raise UserError(f"--image-size {args.image_size}: {args.model} needs at least {need} px")
    model = build_model(args.model, num_classes=args.num_classes)
    print(summarize(model, args.model, args.image_size, args.num_classes).table(args.depth))


def _models(args: argparse.Namespace) -> None:
    from pipeline.models import REGISTRY, list_models

    names = list_models(args.pattern)
    for name in names:
        print(f"{name:<40}{REGISTRY[name].description}" if name in REGISTRY else name)
    print(f"{len(names)} models" + (f" matching {args.pattern!r}" if args.pattern else "")
          + " (ours, then timm's; any of them works as `model:` in params.yaml)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pipeline", description="Tools around the image-classification pipeline.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="layer table, parameter counts and MACs/FLOPs of a model")
    s.add_argument("-m", "--model", required=True, help="a registry or timm model name, e.g. resnet18")
    s.add_argument("--image-size", type=int, default=32, help="input height and width in pixels (default 32)")
    s.add_argument("--num-classes", type=int, default=10, help="outputs of the head (default 10)")
    s.add_argument("--depth", type=int, default=2, help="module nesting shown in the table (default 2)")
    s.set_defaults(fn=_summary)
    m = sub.add_parser("models", help="list the available model names")
    m.add_argument("pattern", nargs="?", default="", help="glob pattern, e.g. 'efficientnet*'")
    m.set_defaults(fn=_models)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_cli(lambda: args.fn(args))
