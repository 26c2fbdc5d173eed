"""A trial of `python -m pipeline tune` (pipeline/tune.py): who runs it, and the train stage as one.

Who: when tune asks the study for a trial it records its host, pid and the pid's start time as
the trial's user attrs (`owner`). A tune that starts later fails the study's RUNNING trials whose
tune is gone from this host (`orphans`: killed with -9, the machine rebooted), so a killed search
leaves no trial RUNNING for ever. Trials run from another machine are left as they are. How:
each trial's `dvc exp run` runs under `guard` (`python -m pipeline.training.trial TUNE_PID CMD`),
the leader of a process group that the kernel signals when tune dies (PR_SET_PDEATHSIG); it then
stops the stage first, so that dvc removes its temporary copy of the repo, then the rest.

The stage: tune runs each trial as a DVC experiment named `<study>-trial-<number>` with the environment
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
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.processes import process_gone, this_process, tie_to_parent

ENV = "PIPELINE_TUNE"
STORAGE_ENV = "OPTUNA_STORAGE"  # the storage URL, when it holds a password: never in params.yaml or ENV
GRACE_S = 10  # seconds an interrupted trial's processes get to stop before SIGKILL


class Pruned(UserError):
    """The study's pruner stopped this trial."""


def settings() -> dict | None:
    return json.loads(os.environ[ENV]) if os.environ.get(ENV) else None


def storage(s: dict) -> str:
    """The study's storage URL: OPTUNA_STORAGE first (ENV's copy has its password masked)."""
    return os.environ.get(STORAGE_ENV) or s["storage"]


OWNER_ATTR = "tune_process"  # the trial's user attr: which tune runs it (`processes.this_process`)


def owner() -> dict:
    """The user attrs that say which process runs a trial."""
    return {OWNER_ATTR: this_process()}


def orphans(study) -> list[int]:
    """Numbers of the study's RUNNING trials whose tune ran on this host and is gone."""
    return [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
            and OWNER_ATTR in t.user_attrs and process_gone(str(t.user_attrs[OWNER_ATTR]))]


def _group() -> dict[int, int]:
    """The other live processes of this process group: pid -> parent pid (Linux; {} elsewhere)."""
    out, me = {}, os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == os.getpgrp() and state != "Z" and int(stat.parent.name) != me:
            out[int(stat.parent.name)] = int(ppid)
    return out


def _signal(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_for(done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


def _end(proc: subprocess.Popen) -> None:
    """End the trial: its stage first (SIGTERM) while dvc waits for it and then cleans up, then
    whatever of the group is left (SIGTERM, SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second request changes nothing
    _signal(set(_group()) - {proc.pid}, signal.SIGTERM)
    _wait_for(lambda: proc.poll() is not None, GRACE_S)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal(_group() or ([proc.pid] if proc.poll() is None else []), sig)
        _wait_for(lambda: not _group() and proc.poll() is not None, 2)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def guard(parent: int, cmd: list[str]) -> int:
    """Run `cmd` in this process's group; end it (`_end`) on SIGTERM, which the kernel sends when
    `parent` dies. Returns `cmd`'s exit code."""
    if not tie_to_parent(parent, signal.SIGTERM):  # tune died before that took hold
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    proc = None
    try:
        proc = subprocess.Popen(cmd)
        return proc.wait()
    except KeyboardInterrupt:
        if proc is not None:
            _end(proc)
        return 130


def run_guarded(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run `cmd` under `guard`, in a process group of its own that ends with the calling process
    (tune), even killed with -9. Its exit code and output."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.training.trial", str(os.getpid()), *cmd], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate()
    finally:
        if proc.poll() is None:  # tune interrupted (Ctrl-C, SIGTERM): the guard ends the trial
            proc.terminate()
            try:
                proc.wait(timeout=GRACE_S + 5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, output


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

    study = optuna.load_study(study_name=s["study"], storage=storage(s), pruner=optuna.pruners.MedianPruner(
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


if __name__ == "__main__":
    sys.exit(guard(int(sys.argv[1]), sys.argv[2:]))
