"""The k folds' records into metrics/crossval.json, metrics/oof_predictions.csv and MLflow
runs (a parent, a nested run per fold). Imports no torch: it only reads the fold records."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import paths
from pipeline.crossval import SPLITS, fold_file
from pipeline.errors import UserError
from pipeline.io import read_json, write_json


def read_folds(k: int) -> list[dict]:
    records = []
    for f in range(k):
        record = read_json(fold_file(f)) if fold_file(f).exists() else {}
        if not record.get("used") or record.get("folds") != k:
            raise UserError(f"{fold_file(f)} is not fold {f} of a {k}-fold run; run the folds first: dvc repro crossval")
        records.append(record)
    return records


def aggregate(records: list[dict]) -> dict[str, Any]:
    """{"folds": k, metric: {"mean", "std" (sample, ddof=1), "per_fold"}} for every metric."""
    out: dict[str, Any] = {"folds": len(records)}
    for name in records[0]["metrics"] if records else ():
        values = [float(r["metrics"][name]) for r in records]
        out[name] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                     "per_fold": values}
    return out


def oof_table(records: list[dict]):
    """One row per pooled train+val image: where it came from, its fold, label and out-of-fold
    class probabilities."""
    import pandas as pd

    frames = []
    for r in records:
        oof = r["oof"]
        frame = pd.DataFrame({"split": oof["split"], "index": oof["index"], "fold": r["fold"],
                              "label": [r["classes"][i] for i in oof["label"]]})
        probs = pd.DataFrame(oof["probs"], columns=[f"p_{c}" for c in r["classes"]])
        frames.append(pd.concat([frame, probs], axis=1))
    order = {s: i for i, s in enumerate(SPLITS)}
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["split", "index", "fold", "label"])
    return table.sort_values(["split", "index"], key=lambda c: c.map(order) if c.name == "split" else c,
                             ignore_index=True)


def summarize(params) -> dict:
    """metrics/crossval.json and metrics/oof_predictions.csv from the k fold records; the MLflow
    runs. With crossval off, a record that says so."""
    from pipeline.io import atomic_path

    k = params.crossval.folds
    records = read_folds(k)
    summary = aggregate(records)
    write_json(paths.CROSSVAL_METRICS, summary)
    with atomic_path(paths.OOF_PREDICTIONS) as tmp:
        oof_table(records).to_csv(tmp, index=False, float_format="%.6f")
    if records:
        log_runs(params.mlflow.experiment, summary, records)
        acc = summary["accuracy"]
        print(f"crossval: {k} folds: accuracy {acc['mean']:.4f} ± {acc['std']:.4f} (per fold "
              + ", ".join(f"{v:.4f}" for v in acc["per_fold"]) + f"); out-of-fold predictions → {paths.OOF_PREDICTIONS}")
    else:
        print("crossval: off (crossval.folds: 0)")
    return summary


def log_runs(experiment: str, summary: dict, records: list[dict]) -> None:
    """A parent run (mean and std of every metric) with one nested run per fold (its curves and
    held-out metrics)."""
    import os

    from pipeline import runview, tracking

    first = records[0]["params"]
    name = f"{os.environ.get('DVC_EXP_NAME') or first['model']}-crossval-{len(records)}"
    tags = tracking.run_tags(first["dataset"], first["model"], first["finetune"], bool(first["pretrained"]))
    with tracking.run_block(experiment, name, tags | {"crossval": "parent"}) as mlflow:
        if mlflow is None:
            return
        tracking.log_params(mlflow, first)
        tracking.log_metrics(mlflow, {f"crossval/{m}_{stat}": v[stat] for m, v in summary.items() if m != "folds"
                                      for stat in ("mean", "std")})
        tracking.log_artifacts(mlflow, [paths.CROSSVAL_METRICS, paths.OOF_PREDICTIONS])
        for r in records:
            with tracking.run_block(experiment, f"{name}-fold-{r['fold']}", tags | {"crossval": f"fold {r['fold']}"},
                                    nested=True) as child:
                for row in r["history"]:
                    tracking.log_metrics(child, runview.epoch_metrics(row), step=int(row["epoch"]))
                tracking.log_metrics(child, {f"held_out/{m}": v for m, v in r["metrics"].items()})
