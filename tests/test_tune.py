"""`python -m pipeline tune`: a bad space or study name stops before any trial; the pruning hook
of the train stage; `-S` values as DVC reads them; with a stub train stage (real DVC experiments,
seconds each): dict overrides, a run with no success, a resumed study's new proposals, a killed
tune; a storage driver that is missing; and (slow) a real 3-trial search with the real dvc CLI
and MLflow, resumed and applied."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.training import trial
from tests.conftest import TINY, clean_env, gone, left_over, run, set_params


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
def test_a_search_of_two_trials_resumes_to_three_and_applies(project: Path):
    set_params(project, **{"tune.space": {"lr": {"low": 0.001, "high": 0.01, "log": True}, "batch_size": [32, 64]},
                           "tune.prune": False})
    run(["git", "commit", "-qam", "a small space"], project)
    fixed = ["-S", "epochs=1", "-S", f"image_size={TINY['image_size']}"]
    out = tune(project, "--trials", "2", *fixed).stdout
    assert out.count(": COMPLETE") == 2
    exps = run(["dvc", "exp", "ls", "--name-only"], project).stdout.split()
    assert sorted(exps) == [f"image-classification-trial-{n}" for n in range(2)]
    results = json.loads((project / "metrics/tune.json").read_text())
    assert [t["state"] for t in results["trials"]] == ["COMPLETE"] * 2
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
    # resumed: the same study goes on to 3 trials, in the same parent run; --apply takes the best
    out = tune(project, "--trials", "3", "--apply", *fixed).stdout
    assert "2 of 3 trials done" in out and out.count(": COMPLETE") == 1
    results = json.loads((project / "metrics/tune.json").read_text())
    assert len(results["trials"]) == 3
    params = (project / "params.yaml").read_text()
    assert f"lr: {results['best_params']['lr']}" in params and "# peak learning rate" in params  # comments kept
    runs = client.search_runs([parent.info.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 3


# A train stage that takes no time: it writes best_val_accuracy from batch_size, fails on purpose
# (one ERROR line) when batch_size >= 1000, and sleeps when epochs >= 100 (a trial to kill).
STUB_TRAIN = '''stages:
  train:
    cmd: >-
      python -c "import json, os, sys, time, yaml; p = yaml.safe_load(open('params.yaml'));
      time.sleep(600 if p['epochs'] >= 100 else 0); p['batch_size'] < 1000 or sys.exit('ERROR: too big');
      os.makedirs('metrics', exist_ok=True);
      json.dump({'best_val_accuracy': p['batch_size'] / 1000}, open('metrics/train.json', 'w'))"
    params: [lr, batch_size, epochs]
    metrics:
      - metrics/train.json:
          cache: false
'''


@pytest.fixture
def quick(project: Path) -> Path:
    """The project with STUB_TRAIN as its pipeline and a small space: real DVC experiments, seconds each."""
    (project / "dvc.yaml").write_text(STUB_TRAIN)
    (project / "dvc.lock").unlink(missing_ok=True)
    set_params(project, **{"tune.space": {"lr": {"low": 0.001, "high": 0.1, "log": True}, "batch_size": [32, 64]}})
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a stub train stage"], project)
    return project


def trials_of(project: Path, study: str = "image-classification") -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{project / 'optuna.db'}").trials


@pytest.mark.parametrize("settings", [
    {"tune.space": {"lr": {"low": 0.001, "high": 0.01, "log": True}, "train.optimizer": ["sgd", "adamw"]}},
    {"tune.space": {}}, {"other.space": {"lr": [0.5]}}, {"new.key": [1, "two", None, True, 2.5e-05]},
    {"lr": 0.003, "name": "a b, c: d=e [f] {g}", "flag": False}, {"name": "it's \\ a\\"}, {"name": None},
    {"name": "true"}, {"name": "nan"}, {"name": "5"}, {"name": ""}, {"name": "data/raw"}, {"name": "résumé"},
    {"other.space": {"a b": 1, "c:d": [1]}},
])
def test_dvc_reads_every_override_back_as_tune_means_it(tmp_path, settings):
    from dvc.utils.hydra import apply_overrides

    from pipeline.tune import _set, dvc_overrides

    raw = {"lr": "auto", "name": "x", "flag": True, "tune": {"space": {"a": 1}},
           "other": {"space": {"lr": {"low": 0.1, "high": 1}, "bs": [1, 2]}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    apply_overrides(tmp_path / "params.yaml", dvc_overrides(settings, raw)[1::2])  # what `dvc exp run -S` does
    want = raw
    for key, value in settings.items():
        want = _set(want, key, value)  # a dict replaces (Hydra alone would merge it)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == want


@pytest.mark.slow
def test_a_dict_override_reaches_the_trials_and_no_success_exits_non_zero(quick: Path):
    out = tune(quick, "--trials", "1", "-S", "tune.space={lr: [0.05], batch_size: [16, 48]}").stdout
    assert out.count(": COMPLETE") == 1, out
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], quick).stdout.split()[0]
    trial_params = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], quick).stdout)
    assert trial_params["tune"]["space"] == {"lr": [0.05], "batch_size": [16, 48]}
    assert trial_params["lr"] == 0.05 and trial_params["batch_size"] in (16, 48)
    proc = tune(quick, "--trials", "2", "-S", "tune.study=too big", "-S", "tune.space={batch_size: [2048]}",
                check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "all 2 trials of this run failed" in errors[0] and "too big" in errors[0], errors[0]
    assert [t.state.name for t in trials_of(quick, "too big")] == ["FAIL", "FAIL"]


@pytest.mark.slow
def test_an_extended_study_proposes_new_points_reproducibly(quick: Path):
    import optuna

    from pipeline.tune import make_sampler

    tune(quick, "--trials", "3", "--sampler", "random")
    tune(quick, "--trials", "5", "--sampler", "random")
    lrs = [t.params["lr"] for t in trials_of(quick)]
    assert len(lrs) == 5 and len(set(lrs)) == 5, lrs  # trials 3-4 replay none of 0-2
    space = {"lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True),
             "batch_size": optuna.distributions.CategoricalDistribution([32, 64])}  # quick's space, in order

    def proposals() -> list[float]:  # the same study, the same way: the same points
        study = optuna.create_study()
        for held in (0, 3):
            study.sampler = make_sampler("random", 0, held, 5)
            for _ in range(3 if held == 0 else 2):
                study.tell(study.ask(space), 0.5)
        return [t.params["lr"] for t in study.trials]

    assert proposals() == proposals() == lrs


def _tune_mid_trial(project: Path) -> subprocess.Popen:
    """`tune` started with a trial that sleeps; returned once the trial's stage runs."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tune", "--trials", "3", "-S", "epochs=100"],
                            cwd=project, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any("time.sleep" in c for c in left_over(project)) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    return proc


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="/proc, PR_SET_PDEATHSIG")
def test_a_killed_tune_leaves_no_trial_running_and_no_process(quick: Path):
    tuner = _tune_mid_trial(quick)
    tuner.send_signal(signal.SIGTERM)  # as `kill`, a CI timeout: the trial is ended and marked at once
    assert tuner.wait(timeout=30) == 130 and not gone(quick)
    assert [t.state.name for t in trials_of(quick)] == ["FAIL"]
    tuner = _tune_mid_trial(quick)
    tuner.kill()  # kill -9: nothing of tune runs; the kernel tells the trial's guard, which ends it
    tuner.wait()
    assert not gone(quick), left_over(quick)
    assert not list(quick.glob(".dvc/tmp/exps/standalone/tmp*"))  # dvc outlived its stage and cleaned up
    assert [t.state.name for t in trials_of(quick)] == ["FAIL", "RUNNING"]
    out = tune(quick, "--trials", "2").stdout  # the next tune fails what the killed one left RUNNING
    assert "trial 1 was left RUNNING by a tune that is gone: marked FAIL" in out, out
    assert [t.state.name for t in trials_of(quick)] == ["FAIL", "FAIL"]


def test_storage_from_the_environment_a_missing_driver_is_one_line_without_the_password(project: Path,
                                                                                         monkeypatch):
    from pipeline.core.params import Params
    from pipeline.tune import storage_url

    url = "postgresql://tune:s3cret@db.example/optuna"
    monkeypatch.setenv("OPTUNA_STORAGE", url)
    assert storage_url(Params()) == url  # the environment overrides tune.storage
    proc = run([sys.executable, "-m", "pipeline", "tune", "--trials", "1"], project, check=False,
               OPTUNA_STORAGE=url)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install" in errors[0] and "psycopg" in errors[0] and "OPTUNA_STORAGE" in errors[0], errors[0]
    assert "s3cret" not in proc.stdout + proc.stderr and "tune:***@db.example" in errors[0]
    assert not (project / "optuna.db").exists() and not (project / "metrics/tune.json").exists()


@pytest.mark.parametrize("study", ["it's", 'a"b', "a/b", " "])
def test_a_study_name_the_mlflow_filter_cannot_hold_is_refused(study):
    from pipeline.core.errors import UserError
    from pipeline.core.params import parse_params

    with pytest.raises(UserError, match=r"tune\.study=.*letters .*e\.g\. tune\.study: "):
        parse_params({"tune": {"study": study}})
    assert parse_params({"tune": {"study": "cifar10 resnet18_v2.1-a"}}).tune.study == "cifar10 resnet18_v2.1-a"
