"""The k folds' records into metrics/crossval.json, metrics/oof_predictions.csv and MLflow
runs (one per fold, nested under the train stage's run). Imports no torch."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core import paths
from pipeline.core.io import write_json
from pipeline.crossval import SPLITS


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
                              "label": [r["classes"][i] if isinstance(i, int) else  # k-hot rows: the labels, by ';'
                                        ";".join(c for c, on in zip(r["classes"], i) if on) for i in oof["label"]]})
        probs = pd.DataFrame(oof["probs"], columns=[f"p_{c}" for c in r["classes"]])
        frames.append(pd.concat([frame, probs], axis=1))
    order = {s: i for i, s in enumerate(SPLITS)}
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["split", "index", "fold", "label"])
    return table.sort_values(["split", "index"], key=lambda c: c.map(order) if c.name == "split" else c,
                             ignore_index=True)


def summarize(records: list[dict]) -> dict:
    """metrics/crossval.json and metrics/oof_predictions.csv from the k fold records (with
    cross-validation off, none: `{"folds": 0}` and an empty out-of-fold table)."""
    from pipeline.core.io import atomic_path

    summary = aggregate(records)
    write_json(paths.CROSSVAL_METRICS, summary)
    with atomic_path(paths.OOF_PREDICTIONS) as tmp:
        oof_table(records).to_csv(tmp, index=False, float_format="%.6f")
    if records:
        key = "map_macro" if "map_macro" in summary else "accuracy"
        acc = summary[key]
        print(f"crossval: {len(records)} folds: {key} {acc['mean']:.4f} ± {acc['std']:.4f} (per fold "
              + ", ".join(f"{v:.4f}" for v in acc["per_fold"]) + f"); out-of-fold predictions → {paths.OOF_PREDICTIONS}")
    return summary


def summary_metrics(summary: dict) -> dict[str, float]:
    """crossval.json as MLflow metrics: `crossval/<metric>_mean` and `_std` (tidy, as the UI shows them)."""
    from pipeline.runview import tidy

    return {f"crossval/{m}_{stat}": tidy(v[stat]) for m, v in summary.items() if m != "folds"
            for stat in ("mean", "std")}


def log_folds(mlflow, run_name: str, tags: dict[str, str], records: list[dict]) -> None:
    """One run per fold (its curves and held-out metrics), nested under the active run."""
    from pipeline import runview, tracking

    if mlflow is None:
        return
    for r in records:
        name, fold_tags = f"{run_name} · fold {r['fold']}", tags | {"crossval": f"fold {r['fold']}"}
        with tracking.child_run(mlflow, name, fold_tags) as child:
            for row in r["history"]:
                tracking.log_metrics(child, runview.epoch_metrics(row), step=int(row["epoch"]))
            tracking.log_metrics(child, {f"held_out/{m}": v for m, v in r["metrics"].items()})
