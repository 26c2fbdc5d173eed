"""`python -m pipeline tune`: a bad space stops before any trial; the pruning hook of the train
stage; and (slow) a real 3-trial search with the real dvc CLI and MLflow, resumed and applied."""
import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.training import trial
from tests.conftest import TINY, run, set_params


def tune(project: Path, *args: str, check: bool = True):
    return run([sys.executable, "-m", "pipeline", "tune", *args], project, check=check, timeout=900)


@pytest.mark.parametrize("space, words", [
    ({"learning_rate": [0.1]}, ["tune.space.learning_rate", "not a params.yaml key"]),
    ({"lr": {"low": 0.1, "high": 0.01}}, ["tune.space", "low must be a number below high"]),
    ({"batch_size": [0, 32]}, ["tune.space.batch_size", "value 0 is not allowed"]),
    ({"train.scheduler": ["cosine", "linear"]}, ["tune.space.train.scheduler", "'linear'"]),
])
def test_a_bad_space_is_one_line_before_any_trial(project: Path, space, words):
    set_params(project, **{"tune.space": space})
    proc = tune(project, "--trials", "2", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in errors[0] for w in words), errors[0]
    assert not (project / "optuna.db").exists() and "trial" not in run(["dvc", "exp", "ls"], project).stdout


def test_pruning_hook_reports_and_stops_a_trial_behind_the_others(tmp_path, monkeypatch):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(3):  # three finished trials at 0.9 after epoch 1 and 2
        t = study.ask()
        t.report(0.9, 1)
        t.report(0.9, 2)
        study.tell(t, 0.9)
    settings = {"storage": storage, "study": "s", "parent_run_id": "abc", "report": "val_accuracy"}
    monkeypatch.setenv(trial.ENV, json.dumps(settings))
    assert trial.parent_run_tags() == {"mlflow.parentRunId": "abc"}
    ahead, behind = study.ask(), study.ask()
    monkeypatch.setenv("DVC_EXP_NAME", trial.experiment_name("s", ahead.number))
    hook = trial.pruning_hook(single_process=True)
    hook(1, {"val_accuracy": 0.95})
    hook(2, {"val_accuracy": 0.96})  # ahead of the median: goes on
    monkeypatch.setenv("DVC_EXP_NAME", trial.experiment_name("s", behind.number))
    hook = trial.pruning_hook(single_process=True)
    with pytest.raises(trial.Pruned, match="pruned after epoch 1"):
        hook(1, {"val_accuracy": 0.1})
    assert study.trials[behind.number].user_attrs["pruned_at_epoch"] == 1
    assert study.trials[ahead.number].intermediate_values == {1: 0.95, 2: 0.96}
    assert trial.pruning_hook(single_process=False) is None  # DDP ranks must stop together: no pruning
    monkeypatch.delenv(trial.ENV)
    assert trial.pruning_hook(single_process=True) is None and trial.parent_run_tags() == {}


@pytest.mark.slow
def test_search_of_three_trials_resumes_and_applies(project: Path):
    set_params(project, **{"tune.space": {"lr": {"low": 0.001, "high": 0.01, "log": True}, "batch_size": [32, 64]},
                           "tune.prune": False})
    run(["git", "commit", "-qam", "a small space"], project)
    fixed = ["-S", "epochs=1", "-S", f"image_size={TINY['image_size']}"]
    out = tune(project, "--trials", "3", *fixed).stdout
    assert out.count(": COMPLETE") == 3
    exps = run(["dvc", "exp", "ls", "--name-only"], project).stdout.split()
    assert sorted(exps) == [f"image-classification-trial-{n}" for n in range(3)]
    results = json.loads((project / "metrics/tune.json").read_text())
    assert [t["state"] for t in results["trials"]] == ["COMPLETE"] * 3
    assert results["best_value"] == max(t["value"] for t in results["trials"])
    assert set(results["best_params"]) == {"lr", "batch_size"} and results["objective"] == "best_val_accuracy"
    for png in ("tune_history.png", "tune_importance.png"):
        assert (project / "metrics" / png).stat().st_size > 1000
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tune_study") == "image-classification")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["dvc_exp_name"] for r in children) == sorted(exps)
    assert all("test/accuracy" not in r.data.metrics for r in children)  # the test split is never evaluated
    # resumed: the same study goes on to 4 trials, in the same parent run; --apply takes the best
    out = tune(project, "--trials", "4", "--apply", *fixed).stdout
    assert "3 of 4 trials done" in out and out.count(": COMPLETE") == 1
    results = json.loads((project / "metrics/tune.json").read_text())
    assert len(results["trials"]) == 4
    params = (project / "params.yaml").read_text()
    assert f"lr: {results['best_params']['lr']}" in params and "# peak learning rate" in params  # comments kept
    runs = client.search_runs([parent.info.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 4
