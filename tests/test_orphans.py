"""Killed while recording to MLflow (kill -9: no handler runs): no run stays RUNNING.

The report stage is killed at each point of its record by a wrapper that replaces one of
`pipeline.tracking`'s logging functions with a SIGKILL of its own process, then run again: it
completes the same run, or ends the orphan as KILLED and records a new one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import processes
from tests.conftest import run, set_params

KILLED_AT = """
import os, signal, sys
import pipeline.tracking as tracking

def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(tracking, sys.argv[1], kill)
from pipeline.core.errors import run_cli
from stages.report import main
run_cli(main)
"""


def report_killed_at(project: Path, function: str) -> None:
    proc = run(["python", "-c", KILLED_AT, function], project, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]


def runs_of(project: Path) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits").experiment_id
    return {r.info.run_id: r for r in client.search_runs([experiment])}


@pytest.fixture
def trained(project: Path, first_stages) -> Path:
    set_params(project, epochs=2)
    first_stages(project)
    for name in ("train", "evaluate", "export"):
        run(["python", "-m", f"stages.{name}"], project)
    return project


@pytest.mark.slow
def test_a_report_killed_mid_record_is_completed_or_ended_by_the_next(trained: Path):
    train_run = json.loads((trained / "models/mlflow_run.json").read_text())["run_id"]

    # killed while logging the model into train's run: the next report completes that same run
    report_killed_at(trained, "log_onnx_model")
    assert runs_of(trained)[train_run].info.status == "RUNNING"
    run(["python", "-m", "stages.report"], trained)
    (only,) = runs_of(trained).values()
    assert only.info.run_id == train_run and only.info.status == "FINISHED"
    assert "test/accuracy" in only.data.metrics

    # train did not run for this report: a new run, killed while its training part is recorded
    report_killed_at(trained, "log_metrics")
    orphan = next(r for r in runs_of(trained).values() if r.info.run_id != train_run)
    assert orphan.info.status == "RUNNING"
    out = run(["python", "-m", "stages.report"], trained).stdout
    assert "ended as KILLED" in out
    runs = runs_of(trained)
    assert runs[orphan.info.run_id].info.status == "KILLED"
    (new,) = [r for r in runs.values() if r.info.run_id not in (train_run, orphan.info.run_id)]
    assert new.info.status == "FINISHED" and {"test/accuracy", "accuracy/val"} <= set(new.data.metrics)
    assert [r.info.status for r in runs.values()].count("RUNNING") == 0

    # any other run of the experiment a killed process left RUNNING (a fold's, an ensemble's)
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    proc = run(["python", "-c", ABANDONED, uri], trained, check=False)
    assert proc.returncode == -9
    (abandoned,) = [r for r in runs_of(trained).values() if r.info.status == "RUNNING"]
    run(["python", "-m", "stages.report"], trained)  # its run is complete: it records a new one, and looks
    assert runs_of(trained)[abandoned.info.run_id].info.status == "KILLED"


ABANDONED = """
import os, signal, sys
import mlflow
import pipeline.tracking as tracking
import pipeline.core.processes as processes

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("digits")
mlflow.start_run(run_name="fold 1", tags={tracking.PROCESS_TAG: processes.this_process()})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_is_gone_once_it_exits_and_another_hosts_cannot_be_told():
    child = subprocess.Popen([sys.executable, "-c", "import pipeline.core.processes as p; print(p.this_process())"],
                             stdout=subprocess.PIPE, text=True)
    owner = child.communicate()[0].strip()
    assert processes.process_gone(owner)
    assert not processes.process_gone(processes.this_process())
    assert not processes.process_gone("elsewhere 1 0.00") and not processes.process_gone("not a tag")
