"""How a pipeline run reads in the MLflow UI: metric names in sections, the run's description,
the data set as the run's input, and what stays out of the charts (diagnostics).

MLflow's UI (3.x) draws one chart section per metric-name prefix (the part before the last
"/") in plain sorted order, one-value metrics as bars, stepped ones as lines (checked in the
3.17 UI's code and in Chromium). So the per-epoch curves are named `epoch/train/…` and
`epoch/val/…`: "epoch" sorts before "export", "test" and "train", and the curves are the first
charts a person sees on a run's page and in the experiment's chart view. The one-value results
follow in `export/…`, `test/…` and `train/…`. Counts, threads, processes and latency samples are
not metrics: they go to `diagnostics/*.json` artifacts of the run.
"""
from __future__ import annotations

import subprocess
from typing import Any

import yaml

# history column -> MLflow metric (step = epoch)
CURVES = {"train_loss": "epoch/train/loss", "train_accuracy": "epoch/train/accuracy", "lr": "epoch/train/lr",
          "val_loss": "epoch/val/loss", "val_accuracy": "epoch/val/accuracy"}
TRAIN_RESULTS = ("best_val_accuracy", "best_val_loss", "best_epoch", "epochs_run")
TRAIN_SPEED = {"train_seconds": "train/seconds", "train_images_per_second": "train/images_per_second"}
EXPORT_RESULTS = ("top1_agreement", "max_abs_logit_diff", "onnx_latency_ms_p50", "torch_latency_ms_p50")
TEST_COUNTS = ("n_test", "tta_views")  # in the diagnostics, not a chart


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """One epoch's row of the history as MLflow metrics (the rest of the row is diagnostics)."""
    return {name: float(row[key]) for key, name in CURVES.items() if key in row}


def train_metrics(summary: dict[str, Any], timing: dict[str, Any]) -> dict[str, float]:
    return ({f"train/{k}": float(summary[k]) for k in TRAIN_RESULTS if k in summary}
            | {name: float(timing[k]) for k, name in TRAIN_SPEED.items() if k in timing})


def test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"test/{k}": float(v) for k, v in metrics.items() if k not in TEST_COUNTS}


def export_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {f"export/{k}": float(result[k]) for k in EXPORT_RESULTS if k in result}


def committed_params(path: str = "params.yaml") -> dict[str, Any] | None:
    """params.yaml as committed at HEAD, flattened like `Params.flat()`; None outside git or
    when the committed file does not parse any more."""
    from pipeline.params import parse_params

    try:
        out = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return parse_params(yaml.safe_load(out.stdout) or {}, f"HEAD:{path}", check_models=False).flat()
    except Exception:  # an old params.yaml that today's schema rejects: no comparison, not an error
        return None


def changed_params(now: dict[str, Any], committed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The params whose value differs from the committed params.yaml (None: unknown)."""
    if committed is None:
        return None
    return {k: v for k, v in now.items() if committed.get(k) != v}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def description(*, model: str, dataset: str, finetune: str, transferred: bool, n_classes: int, n_train: int,
                image_size: int, lr: float, changed: dict[str, Any] | None) -> str:
    """The run's description (`mlflow.note.content`, Markdown), shown on its page."""
    start = "ImageNet weights" if transferred else "from scratch"
    strategy = {"full": "full fine-tuning", "linear_probe": "linear probe", "partial": "partial fine-tuning",
                "two_phase": "two-phase fine-tuning"}.get(finetune, finetune) if transferred else "trained"
    lines = [f"**{model}** on **{dataset}** ({n_classes} classes, {n_train:,} training images at {image_size} px): "
             f"{strategy}, {start}, lr {lr:g}."]
    if changed is None:
        lines.append("Params: params.yaml's committed values could not be read (not a git checkout).")
    elif changed:
        lines.append("Differs from params.yaml at HEAD: " + ", ".join(f"`{k}={_short(v)}`" for k, v in changed.items()))
    else:
        lines.append("Params: params.yaml as committed.")
    return "\n\n".join(lines)


def dataset_input(name: str, digest: str, source: str, split: str, n_images: int, image_size: int) -> Any:
    """An MLflow data set entry (the runs table's Dataset column) for one prepared split:
    its name, the sha256 of its files as the digest, where it lives and its shape."""
    import numpy as np
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, image_size, image_size), name="image"),
                     TensorSpec(np.dtype(np.int64), (-1,), name="label")])
    return MetaDataset(LocalArtifactDatasetSource(source), name=f"{name}/{split} ({n_images:,} images)",
                       digest=digest[:16], schema=schema)
