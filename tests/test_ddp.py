"""Distributed training for real: `train.nproc: 2` runs the train stage under torchrun with
DDP on the CPU (gloo): one checkpoint, one MLflow run, metrics over both processes."""
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run, set_params


@pytest.mark.slow
def test_torchrun_two_processes(project: Path, first_stages):
    set_params(project, **{"train.nproc": 2, "epochs": 2})
    first_stages(project)
    out = run(["python", "-m", "stages.train"], project)
    assert "torch.distributed.run --standalone --nproc_per_node=2" in out.stdout
    summary = json.loads((project / "metrics/train.json").read_text())
    timing = json.loads((project / "metrics/train_timing.json").read_text())  # not a DVC output: it varies
    assert timing["processes"] == 2 and timing["threads"] == 1
    assert summary["best_val_accuracy"] > 0.5
    assert (project / "models/model.pt").exists() and not (project / "checkpoints/last.pt").exists()
    assert out.stdout.count("train: best epoch") == 1  # rank 0 alone reports and writes
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss/train")
    assert [m.step for m in history] == [1, 2]
    run(["python", "-m", "stages.evaluate"], project)  # the checkpoint is a plain one (no DDP prefixes)


@pytest.mark.parametrize("share, cores", [("3", 3), ("", None), ("0", None), ("two", None)])
def test_the_cores_are_omp_num_threads_when_set(monkeypatch, share, cores):
    """`train.num_threads: 0` divides these among the processes; the train stage passes them to
    torchrun's workers, which would otherwise get OMP_NUM_THREADS=1 from torchrun."""
    import os

    from pipeline.training.distributed import cpu_cores

    monkeypatch.setenv("OMP_NUM_THREADS", share)
    assert cpu_cores() == (cores or os.cpu_count())
