"""`python -m pipeline tune`: hyperparameter search with Optuna, every trial a DVC experiment.

The space is params.yaml's `tune.space` (ranges and choices of params keys). Each trial Optuna
proposes runs as `dvc exp run --temp --name <study>-trial-<n> -S key=value ... <target>`, a real
DVC experiment (`dvc exp show`, `dvc exp apply`), whose train stage logs an MLflow run nested
under the study's parent run. The target is `train` (objective: its best validation accuracy
or loss, or with `crossval.folds` > 0 the folds' mean accuracy, which the train stage
computes first): the test split is never evaluated, so it cannot leak into the choice. With
`--jobs J` > 1 the trials of a round are queued and run by J DVC queue workers.

The study lives in an Optuna storage: the environment variable OPTUNA_STORAGE when set (a URL
with a password goes there, never in params.yaml), else `tune.storage` (default
sqlite:///<repo root>/optuna.db; an RDB URL shares it between machines). Every URL tune prints
or records has its password masked. A re-run with the same study name resumes, `--trials N`
being the total; it first fails the trials a killed tune on this machine left RUNNING
(pipeline/training/trial.py). Each trial runs in a process group of its own that ends with
tune, even killed with -9 (`guard` in pipeline/training/trial.py). The sampler is seeded with
params `seed` and the number of trials the study already holds: the same command on the same
study proposes the same points, and a resumed or extended study goes on with new ones instead
of replaying its first proposals.

`-S key=value` values are YAML; each trial gets them as DVC's `-S` reads them (Hydra's override
grammar: a dict replaces the one in params.yaml, a key params.yaml lacks is added). tune exits
non-zero when no trial it ran finished (all failed).

Results: metrics/tune.json, metrics/tune_history.png, metrics/tune_importance.png, also in the
parent MLflow run; `--apply` writes the best trial's values into params.yaml (comments kept);
`dvc exp apply <study>-trial-<n>` brings that trial's outputs too.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline import mlstore, tracking

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.params import Params, parse_params, read_yaml
from pipeline.core.secrets import redact, redact_text
from pipeline.training import trial

OBJECTIVES = {  # name -> (dvc target, metrics file, key in it, direction, per-epoch column to report)
    "best_val_accuracy": ("train", paths.TRAIN_METRICS, "best_val_accuracy", "maximize", "val_accuracy"),
    "best_val_loss": ("train", paths.TRAIN_METRICS, "best_val_loss", "minimize", "val_loss"),
    "crossval_accuracy": ("train", paths.CROSSVAL_METRICS, "accuracy", "maximize", None),
    "best_val_map": ("train", paths.TRAIN_METRICS, "best_val_map", "maximize", "val_map"),  # task=multilabel
    "crossval_map": ("train", paths.CROSSVAL_METRICS, "map_macro", "maximize", None),
}


def objective_name(params: Params) -> str:
    name, labels = params.tune.objective, params.task == "multilabel"
    if name == "auto":
        return ("crossval_" if params.crossval.folds else "best_val_") + ("map" if labels else "accuracy")
    if name.startswith("crossval_") and not params.crossval.folds:
        raise UserError(f"tune.objective={name} needs crossval.folds ≥ 2 (or -S crossval.folds=5)")
    if labels and name.endswith("accuracy") or not labels and name.endswith("map"):
        fits = "best_val_map, crossval_map" if labels else "best_val_accuracy, crossval_accuracy"
        raise UserError(f"tune.objective={name} does not fit task={params.task}; use auto, best_val_loss or {fits}")
    return name


def storage_url(params: Params) -> str:
    """OPTUNA_STORAGE when set, else tune.storage (auto: optuna.db in the repo root)."""
    if os.environ.get(trial.STORAGE_ENV):
        return os.environ[trial.STORAGE_ENV]
    if params.tune.storage != "auto":
        return params.tune.storage
    return f"sqlite:///{paths.repo_root() / 'optuna.db'}"


def open_storage(url: str):
    """The Optuna storage at `url`; a driver that is not installed, a URL that is not a database's
    or a database that cannot be opened: one line, before any trial."""
    import optuna
    import sqlalchemy.exc

    source = trial.STORAGE_ENV if os.environ.get(trial.STORAGE_ENV) else "tune.storage"
    where = f"Optuna storage ({source})"
    if problem := mlstore.driver_problem(url):  # the same check as a database tracking URI's
        raise UserError(f"{where}: {problem}; use e.g. sqlite:///optuna.db or postgresql://user@host/db")
    try:
        return optuna.storages.RDBStorage(url)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        line = redact_text(str(exc).splitlines()[0], url)
        raise UserError(f"{where} {redact(url)} cannot be opened ({line}); check the URL and that the database "
                        "server is up") from None


def make_sampler(kind: str, seed: int, held: int, trials: int):
    """Optuna's sampler, seeded with params `seed` and the number of trials the study holds:
    reproducible, and a resumed study does not replay the proposals it started with."""
    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([seed, held]).generate_state(1)[0])
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))


def check_space(study, space: dict[str, Any]) -> None:
    """A key whose kind (choices, int or float range) or choices differ from the study's earlier
    trials (Optuna refuses them): one line, before any trial."""
    for t in study.get_trials(deepcopy=False):
        for key, old in t.distributions.items():
            new = space.get(key)
            if new is not None and (type(new) is not type(old) or getattr(new, "choices", 0) != getattr(old, "choices", 0)):
                raise UserError(f"tune.space.{key} is {new}, but study {study.study_name!r} tried it as {old}: "
                                "give this space a study of its own, e.g. -S tune.study=NEW-NAME")


def ask(study, space: dict[str, Any]):
    """A new trial, its user attrs saying which process runs it (`owner`)."""
    asked = study.ask(space)
    for attr, value in trial.owner().items():
        asked.set_user_attr(attr, value)
    return asked


def fail_orphans(study) -> None:
    """FAIL the study's trials left RUNNING by a tune on this machine that is gone."""
    import optuna

    for number in trial.orphans(study):
        study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        print(f"tune: trial {number} was left RUNNING by a tune that is gone: marked FAIL", flush=True)


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
        value = read_yaml(text)
        parse_params(_set(raw, key, value), f"-S {key}", check_models=key == "model")
        out[key] = value
    return out


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # a string Hydra reads back unquoted, as itself
_KEYWORDS = ("true", "false", "null", "inf", "nan")  # ... unless it is one of these (any case)


def _dict_key(key: Any) -> str:
    return re.sub(r"([][(){}:=,\\ \t])", r"\\\1", str(key))  # Hydra's escapes for a bare key


def _quoted(text: str) -> str:
    """'text' as Hydra reads it back: quotes, and backslashes before a quote, escaped."""
    escaped = re.sub(r"(\\*)'", lambda m: 2 * m.group(1) + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: 2 * m.group(1), escaped) + "'"


def dvc_value(value: Any) -> str:
    """`value` in Hydra's override grammar, which DVC's `-S key=value` parses: flow-style dicts
    and lists with bare keys, strings quoted where they would read back as something else."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_dict_key(k)}: {dvc_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dvc_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) and value.lower() not in _KEYWORDS else _quoted(value)
    return json.dumps(value)  # numbers, true/false, null


def _in(raw: dict, key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dvc_overrides(settings: dict[str, Any], raw: dict) -> list[str]:
    """`-S` arguments that give a trial's params.yaml (now `raw`) `settings`, as tune means them:
    a dict replaces params.yaml's (`key=value` would merge into it), a key it lacks is added."""
    out = []
    for key, value in settings.items():
        if not _in(raw, key):
            out += ["-S", f"+{key}={dvc_value(value)}"]
        elif isinstance(value, dict):
            out += ["-S", f"~{key}", "-S", f"+{key}={dvc_value(value)}"]
        else:
            out += ["-S", f"{key}={dvc_value(value)}"]
    return out


def exp_command(name: str, overrides: list[str], target: str, queue: bool) -> list[str]:
    return ["dvc", "exp", "run", "--queue" if queue else "--temp", "--name", name, *overrides, target]


def shown(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={dvc_value(v)}" for k, v in settings.items())


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


def _error_line(code: int, output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(("error", "ERROR"))]
    return "" if code == 0 else (lines[-1] if lines else f"dvc exited {code}")


def run_round(names: list[str], overrides: list[list[str]], target: str, jobs: int, env: dict) -> list[str]:
    """Run one round of trials as DVC experiments; return each one's last error line ('' if none)."""
    if jobs == 1:
        return [_error_line(*trial.run_guarded(exp_command(n, o, target, queue=False), env))
                for n, o in zip(names, overrides)]
    try:
        for name, o in zip(names, overrides):
            subprocess.run(exp_command(name, o, target, queue=True), env=env, capture_output=True, check=True)
        subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], env=env, capture_output=True, check=True)
        while "Running" in (status := _queue_status()) or "Queued" in status:
            time.sleep(5)
    except KeyboardInterrupt:  # the queue's workers are not ours to outlive: stop this round's tasks
        for name in names:
            for verb in ("remove", "kill"):
                subprocess.run(["dvc", "queue", verb, name], env=env, capture_output=True, check=False)
        raise
    return ["" for _ in names]


def _queue_status() -> str:
    return subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True, check=False).stdout


def tell(study, asked, name: str, error: str, file: Path, key: str) -> str:
    """Record a finished trial in the study: its value, PRUNED or FAIL. Returns its state."""
    import optuna

    from pipeline.tune_results import trial_user_attrs

    value = exp_metric(name, file, key)
    if value is not None:
        study.tell(asked, value)
        return "COMPLETE"
    pruned = "pruned_at_epoch" in trial_user_attrs(study, asked.number)
    study.tell(asked, state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.FAIL)
    if not pruned:
        print(f"tune: {name} failed: {error or 'no metrics'}", flush=True)
    return "PRUNED" if pruned else "FAIL"


def _params(overrides: list[str]) -> tuple[Params, dict, dict[str, Any], dict]:
    """params.yaml with the `-S` overrides: the params, their raw mapping, the overrides alone
    and params.yaml as it is on disk."""
    from pipeline.core.params import load_params

    load_params()  # params.yaml as it is: one line naming a bad key
    on_disk = read_yaml(paths.PARAMS.read_text()) or {}
    fixed = parse_overrides(overrides, on_disk)
    raw = on_disk
    for key, value in fixed.items():
        raw = _set(raw, key, value)
    return parse_params(raw), raw, fixed, on_disk


def tune(trials: int, jobs: int, sampler: str | None, overrides: list[str], apply: bool) -> dict:
    """Run the study up to `trials` finished trials; write and log the results."""
    import optuna

    from pipeline.tune_results import finished, report

    params, raw, fixed, on_disk = _params(overrides)
    space = distributions(raw, params.tune.space)
    name = objective_name(params)
    target, file, key, direction, report_column = OBJECTIVES[name]
    url = storage_url(params)
    storage = open_storage(url)  # a missing driver, a bad URL: one line, before any trial
    tracker = tracking.Tracker.open(params)  # an unusable MLflow store: one line, before any trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kind = sampler or params.tune.sampler
    study = optuna.create_study(study_name=params.tune.study, storage=storage, direction=direction,
                                load_if_exists=True)
    check_space(study, space)
    fail_orphans(study)
    study.sampler = make_sampler(kind, params.seed, len(study.trials), trials)
    tags = {"tune_study": params.tune.study, "tune_objective": name}
    states, errors = [], []
    with tracker.parent_run(params.experiment_name(), f"tune-{params.tune.study}", tags, "tune_study") as mlflow:
        settings = {"storage": redact(url), "study": params.tune.study,
                    "parent_run_id": mlflow.active_run().info.run_id if mlflow else None,
                    "report": report_column if params.tune.prune and params.train.nproc == 1 else None}
        env = os.environ | {trial.ENV: json.dumps(settings), trial.STORAGE_ENV: url}
        print(f"tune: study {params.tune.study!r} in {redact(url)}: {len(finished(study))} of {trials} "
              f"trials done; objective {name} ({direction}), sampler {kind}, {jobs} at a time", flush=True)
        while (left := trials - len(finished(study))) > 0:
            batch = [ask(study, space) for _ in range(min(jobs, left))]
            names = [trial.experiment_name(params.tune.study, t.number) for t in batch]
            chosen = [fixed | t.params for t in batch]
            for n, c in zip(names, chosen):
                print(f"tune: {n}: {shown(c)}", flush=True)
            try:
                round_errors = run_round(names, [dvc_overrides(c, on_disk) for c in chosen], target, jobs, env)
            except KeyboardInterrupt:
                for t in batch:
                    study.tell(t, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                raise
            for t, n, err in zip(batch, names, round_errors):
                err = redact_text(err, url)
                states.append(tell(study, t, n, err, file, key))
                errors.append(err)
                value = study.trials[t.number].value
                print(f"tune: {n}: {states[-1]}" + (f", {name} {value:.4f}" if value is not None else ""), flush=True)
        results = report(study, name, direction, mlflow)
    if states and not {"COMPLETE", "PRUNED"} & set(states):
        last = next((e for e in reversed(errors) if e), "no metrics")
        raise UserError(f"all {len(states)} trials of this run failed, the last with: {last}; fix that and run "
                        "tune again (a trial by hand: dvc exp run -S key=value ... train)")
    if apply and results.get("best_params"):
        from pipeline.core.params import update_params_file

        update_params_file(paths.PARAMS, results["best_params"])
        print("tune: params.yaml now holds the best trial's values: " + shown(results["best_params"])
              + f" (its outputs too: dvc exp apply {results['best_experiment']})")
    return results
