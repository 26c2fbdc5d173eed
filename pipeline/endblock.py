"""The block that ends every pipeline run in the terminal: the result, its change against the
committed one, and where to look (the report, the MLflow run, the comparison of runs). Like
Ultralytics' "Results saved to runs/…", but saying what the result is."""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any
from urllib.parse import quote

from pipeline import mlstore, runview

from pipeline.core import paths

RULE = "─" * 78
HEADLINE = "accuracy"  # the test figure runs are compared by (runview.TEST_HEADLINE's first)
HEADLINES = {"accuracy": "test accuracy", "map_macro": "test mAP"}  # task=multilabel: the macro mAP


def headline(evaluation: dict[str, Any]) -> tuple[str, str]:
    """(the key of eval.json runs are compared by, its name): accuracy, or mAP for labels."""
    key = "map_macro" if "map_macro" in evaluation else HEADLINE
    return key, HEADLINES[key]
UI_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens in its GenAI view without it


def committed_result(dataset: str, key: str = HEADLINE) -> tuple[float | None, str]:
    """(the committed test accuracy, what it is compared as): from metrics/eval.json and
    params.yaml at the experiment's baseline (HEAD outside `dvc exp run`); None when there is
    none, or it is of another data set."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    committed = {}
    for name, path in (("eval", paths.EVAL_METRICS), ("params", paths.PARAMS)):
        try:
            out = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None, "no git"
        if out.returncode != 0:
            return None, "nothing committed"
        committed[name] = out.stdout
    from pipeline.core.params import read_yaml

    params = read_yaml(committed["params"]) or {}
    from pipeline.data.registry import DATASETS, display_name

    before = params.get("dataset", "digits")
    before = display_name(before, params.get("data_dir", "data/raw")) if before in DATASETS else str(before)
    if before != dataset:
        return None, f"the commit is of {before}"
    try:
        return float(json.loads(committed["eval"])[key]), rev[:10]
    except (ValueError, KeyError, TypeError):
        return None, "nothing committed"


def change(now: float, before: float | None, what: str) -> str:
    if before is None:
        return f"({what})"
    delta = now - before
    return f"(committed {before:.4f}: {'same' if abs(delta) < 5e-5 else f'{delta:+.4f}'})"


def addresses(run: dict[str, Any]) -> tuple[str, str, str]:
    """(how to open the UI, the run's page, the experiment's runs best first) in MLflow's UI."""
    uri = run.get("tracking_uri") or mlstore.tracking_uri()
    experiment = f"#/experiments/{run.get('experiment_id', '0')}"
    pages = (f"{experiment}/runs/{run['run_id']}?{UI_VIEW}",
             f"{experiment}/runs?viewStateShareKey={runview.SHARED_VIEW}&{UI_VIEW}")
    if uri.startswith(("http://", "https://")):
        return "", *(f"{uri.rstrip('/')}/{page}" for page in pages)
    default = f"sqlite:///{paths.repo_root() / paths.MLFLOW_DB}"
    start = "mlflow ui" if uri == default else f"mlflow ui --backend-store-uri {quote(uri, safe=':/')}"
    return start, *(f"http://127.0.0.1:5000/{page}" for page in pages)


def end_block(evaluation: dict[str, Any], who: runview.RunIdentity, run: dict[str, Any] | None) -> str:
    """The lines that close a pipeline run."""
    key, name = headline(evaluation)
    accuracy = float(evaluation[key])
    before, what = committed_result(who.tags["dataset"], key)
    how = runview.STRATEGIES.get(who.tags["strategy"], who.tags["strategy"])
    lines = ["", RULE, f"{who.tags['model']} on {who.tags['dataset']} ({how}): {name} {accuracy:.4f} "
             f"{change(accuracy, before, what)}",
             f"  report   {paths.EVAL_REPORT_HTML}  (and {paths.EVAL_REPORT_MD.name} beside it)"]
    if "accuracy_clean" in evaluation:  # test images with a copy in train: the figure without them
        lines.insert(3, f"  clean    test accuracy {float(evaluation['accuracy_clean']):.4f} on the "
                        f"{evaluation['test_images_clean']:,} test images with no near-duplicate in train/val "
                        f"({evaluation['test_images_leaked']:,} have one: {paths.DATA_CARD_MD})")
    if run is None:
        lines.append("  MLflow   off (mlflow.required: false and no usable store)")
    else:
        start, page, best_first = addresses(run)
        lines += [f"  MLflow   run \"{who.name}\" in experiment \"{run.get('experiment', who.experiment)}\""
                  + (f"; the UI: {start}" if start else ""),
                  f"           this run  {page}", f"           all runs  {best_first}"]
    lines += ["  compare  python -m pipeline runs  (every run in the terminal, best first)", RULE]
    return "\n".join(lines)
