"""The train stage as one trial of `python -m pipeline tune` (pipeline/tune.py).

tune runs each trial as a DVC experiment named `<study>-trial-<number>` with the environment
variable PIPELINE_TUNE (JSON: Optuna storage, study, MLflow parent run, the metric to report);
DVC passes it to the stage. The train stage then (1) tags its MLflow run as a child of the
study's parent run and (2) reports the per-epoch validation metric to the trial, stopping
with one line when Optuna's median pruner says the trial is behind the earlier ones. A pruned
trial's stage fails on purpose: DVC then saves nothing (no half-trained model in its run cache
that a later plain run with the same params could restore), and tune records it as PRUNED.
Without PIPELINE_TUNE nothing here does anything.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

from pipeline.errors import UserError

ENV = "PIPELINE_TUNE"


class Pruned(UserError):
    """The study's pruner stopped this trial."""


def settings() -> dict | None:
    return json.loads(os.environ[ENV]) if os.environ.get(ENV) else None


def experiment_name(study: str, number: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', study)}-trial-{number}"


def trial_number(study: str) -> int | None:
    match = re.fullmatch(re.escape(experiment_name(study, 0))[:-1] + r"(\d+)", os.environ.get("DVC_EXP_NAME", ""))
    return int(match.group(1)) if match else None


def parent_run_tags() -> dict[str, str]:
    """The MLflow tag that nests this run under the study's parent run."""
    s = settings()
    return {"mlflow.parentRunId": s["parent_run_id"]} if s and s.get("parent_run_id") else {}


def pruning_hook(single_process: bool) -> Callable[[int, dict], None] | None:
    """A per-epoch callback that reports to the trial and raises `Pruned`; None when not tuning,
    pruning is off, or training runs in several processes (they must stop together)."""
    s = settings()
    if not s or not s.get("report") or not single_process or (number := trial_number(s["study"])) is None:
        return None
    import optuna

    study = optuna.load_study(study_name=s["study"], storage=s["storage"], pruner=optuna.pruners.MedianPruner(
        n_startup_trials=s.get("startup_trials", 3), n_warmup_steps=1))
    trial = optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    metric = s["report"]

    def report(epoch: int, row: dict) -> None:
        trial.report(float(row[metric]), epoch)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch)
            raise Pruned(f"train: trial {number} of study {s['study']!r} pruned after epoch {epoch}: its {metric} "
                         f"{row[metric]:.4f} is below the median of earlier trials at that epoch")
    return report
