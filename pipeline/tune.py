"""`python -m pipeline tune`: hyperparameter search with Optuna, every trial a DVC experiment.

The space is params.yaml's `tune.space` (ranges and choices of params keys). Each trial Optuna
proposes runs as `dvc exp run --temp --name <study>-trial-<n> -S key=value ... <target>`, a real
DVC experiment (`dvc exp show`, `dvc exp apply`), whose train stage logs an MLflow run nested
under the study's parent run. The target is `train` (objective: its best validation accuracy
or loss, or with `crossval.folds` > 0 the folds' mean accuracy, which the train stage
computes first): the test split is never evaluated, so it cannot leak into the choice. With
`--jobs J` > 1 the trials of a round are queued and run by J DVC queue workers.

The study lives in an Optuna storage (default sqlite:///<repo root>/optuna.db; an RDB URL
shares it between machines): a re-run with the same study name resumes, `--trials N` being
the total. Results: metrics/tune.json, metrics/tune_history.png, metrics/tune_importance.png,
also in the parent MLflow run; `--apply` writes the best trial's values into params.yaml
(comments kept); `dvc exp apply <study>-trial-<n>` brings that trial's outputs too.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import paths, tracking
from pipeline.errors import UserError
from pipeline.params import Params, parse_params
from pipeline.training.trial import ENV, experiment_name

OBJECTIVES = {  # name -> (dvc target, metrics file, key in it, direction, per-epoch column to report)
    "best_val_accuracy": ("train", paths.TRAIN_METRICS, "best_val_accuracy", "maximize", "val_accuracy"),
    "best_val_loss": ("train", paths.TRAIN_METRICS, "best_val_loss", "minimize", "val_loss"),
    "crossval_accuracy": ("train", paths.CROSSVAL_METRICS, "accuracy", "maximize", None),
}


def objective_name(params: Params) -> str:
    name = params.tune.objective
    if name == "auto":
        return "crossval_accuracy" if params.crossval.folds else "best_val_accuracy"
    if name == "crossval_accuracy" and not params.crossval.folds:
        raise UserError("tune.objective=crossval_accuracy needs crossval.folds ≥ 2 (or -S crossval.folds=5)")
    return name


def storage_url(params: Params) -> str:
    if params.tune.storage != "auto":
        return params.tune.storage
    return f"sqlite:///{paths.repo_root() / 'optuna.db'}"


def _set(raw: dict, key: str, value: Any) -> dict:
    out = json.loads(json.dumps(raw))
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def distributions(raw: dict, space: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions of `tune.space`, each bound and choice checked against params.yaml's
    own rules (an unknown key, a value the key does not take: one line, before any trial)."""
    import optuna

    known = set(Params().flat())
    out = {}
    for key, spec in space.items():
        if key not in known:
            raise UserError(f"tune.space.{key}: not a params.yaml key; use one of the keys of params.yaml, "
                            "e.g. lr, batch_size, train.weight_decay")
        values = spec if isinstance(spec, list) else [spec["low"], spec["high"]]
        for value in values:
            try:
                parse_params(_set(raw, key, value), f"tune.space.{key}", check_models=key == "model")
            except UserError as exc:
                raise UserError(f"tune.space.{key}: the value {value!r} is not allowed there ({exc})") from None
        if isinstance(spec, list):
            out[key] = optuna.distributions.CategoricalDistribution(spec)
        elif all(isinstance(v, int) for v in (spec["low"], spec["high"])) and not spec.get("log"):
            out[key] = optuna.distributions.IntDistribution(spec["low"], spec["high"])
        else:
            out[key] = optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]),
                                                              log=bool(spec.get("log")))
    if not out:
        raise UserError("tune.space is empty; give params.yaml keys to search, e.g. lr: {low: 0.0003, high: 0.03, "
                        "log: true}")
    return out


def parse_overrides(items: list[str], raw: dict) -> dict[str, Any]:
    """`-S key=value` pairs (YAML values), checked like params.yaml."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"-S {item}: use -S key=value, e.g. -S epochs=5")
        value = yaml.safe_load(text)
        parse_params(_set(raw, key, value), f"-S {key}", check_models=key == "model")
        out[key] = value
    return out


def _dvc_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, list)) or value is None else str(value)


def exp_command(name: str, settings: dict[str, Any], target: str, queue: bool) -> list[str]:
    cmd = ["dvc", "exp", "run", "--queue" if queue else "--temp", "--name", name]
    for key, value in settings.items():
        cmd += ["-S", f"{key}={_dvc_value(value)}"]
    return cmd + [target]


def exp_metric(name: str, file: Path, key: str) -> float | None:
    """The objective as the experiment `name` recorded it (its git ref), None if it has none."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True,
                          text=True, check=False).stdout.split()
    ref = next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)
    if ref is None:
        return None
    shown = subprocess.run(["git", "show", f"{ref}:{file.as_posix()}"], capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        return None
    value = json.loads(shown.stdout)[key]
    return float(value["mean"] if isinstance(value, dict) else value)


def run_round(names: list[str], settings: list[dict], target: str, jobs: int, env: dict) -> list[str]:
    """Run one round of trials as DVC experiments; return each one's last error line ('' if none)."""
    if jobs == 1:
        out = []
        for name, s in zip(names, settings):
            print(f"tune: {name}: " + ", ".join(f"{k}={_dvc_value(v)}" for k, v in s.items()), flush=True)
            proc = subprocess.run(exp_command(name, s, target, queue=False), env=env, capture_output=True, text=True)
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("error", "ERROR"))]
            out.append("" if proc.returncode == 0 else (lines[-1] if lines else f"dvc exited {proc.returncode}"))
        return out
    for name, s in zip(names, settings):
        subprocess.run(exp_command(name, s, target, queue=True), env=env, capture_output=True, check=True)
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], env=env, capture_output=True, check=True)
    while "Running" in (status := _queue_status()) or "Queued" in status:
        time.sleep(5)
    return ["" for _ in names]


def _queue_status() -> str:
    return subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True, check=False).stdout


def tell(study, trial, name: str, error: str, file: Path, key: str) -> str:
    """Record a finished trial in the study: its value, PRUNED or FAIL. Returns its state."""
    import optuna

    from pipeline.tune_results import trial_user_attrs

    value = exp_metric(name, file, key)
    if value is not None:
        study.tell(trial, value)
        return "COMPLETE"
    pruned = "pruned_at_epoch" in trial_user_attrs(study, trial.number)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.FAIL)
    if not pruned:
        print(f"tune: {name} failed: {error or 'no metrics'}", flush=True)
    return "PRUNED" if pruned else "FAIL"


def tune(trials: int, jobs: int, sampler: str | None, overrides: list[str], apply: bool) -> dict:
    """Run the study up to `trials` finished trials; write and log the results."""
    import optuna

    from pipeline.params import load_params
    from pipeline.tune_results import finished, report

    load_params()  # params.yaml as it is: one line naming a bad key
    raw = yaml.safe_load(paths.PARAMS.read_text()) or {}
    fixed = parse_overrides(overrides, raw)
    for key, value in fixed.items():
        raw = _set(raw, key, value)
    params = parse_params(raw)
    space = distributions(raw, params.tune.space)
    name = objective_name(params)
    target, file, key, direction, report_column = OBJECTIVES[name]
    tracking.enabled()  # an unusable MLflow store: one line, before any trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kind = sampler or params.tune.sampler
    study = optuna.create_study(
        study_name=params.tune.study, storage=storage_url(params), direction=direction, load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=params.seed) if kind == "random"
        else optuna.samplers.TPESampler(seed=params.seed, n_startup_trials=min(10, max(2, trials // 3))))
    tags = {"tune_study": params.tune.study, "tune_objective": name}
    with tracking.parent_run(params.experiment_name(), f"tune-{params.tune.study}", tags, "tune_study") as mlflow:
        settings = {"storage": storage_url(params), "study": params.tune.study,
                    "parent_run_id": mlflow.active_run().info.run_id if mlflow else None,
                    "report": report_column if params.tune.prune and params.train.nproc == 1 else None}
        env = os.environ | {ENV: json.dumps(settings)}
        print(f"tune: study {params.tune.study!r} in {storage_url(params)}: {len(finished(study))} of {trials} "
              f"trials done; objective {name} ({direction}), sampler {kind}, {jobs} at a time", flush=True)
        while (left := trials - len(finished(study))) > 0:
            batch = [study.ask(space) for _ in range(min(jobs, left))]
            names = [experiment_name(params.tune.study, t.number) for t in batch]
            chosen = [fixed | t.params for t in batch]
            errors = run_round(names, chosen, target, jobs, env)
            for t, n, err in zip(batch, names, errors):
                state = tell(study, t, n, err, file, key)
                value = study.trials[t.number].value
                print(f"tune: {n}: {state}" + (f", {name} {value:.4f}" if value is not None else ""), flush=True)
        results = report(study, name, direction, mlflow)
    if apply and results.get("best_params"):
        from pipeline.params import update_params_file

        update_params_file(paths.PARAMS, results["best_params"])
        print(f"tune: params.yaml now holds the best trial's values: "
              + ", ".join(f"{k}={_dvc_value(v)}" for k, v in results["best_params"].items())
              + f" (its outputs too: dvc exp apply {results['best_experiment']})")
    return results
