"""`python -m pipeline runs`: the table on hand-made rows (width, order, what differs, unknown
times), training times from a real temporary MLflow store, and, marked slow, the real command on
a project with two real DVC experiments."""
import hashlib
import json
import re
from pathlib import Path

import pytest

from pipeline import runs
from pipeline.core.errors import UserError
from pipeline.core.io import file_sha256
from pipeline.runs import Run, order, table
from tests.conftest import make_project, run

WIDTH = 100


def row(name: str, dataset: str = "digits", acc: float | None = None, val: float | None = None,
        seconds: float | None = None, kind: str = "experiment", model: str = "original", **params) -> Run:
    params = {"dataset": dataset, "model": model, "lr": "auto", "epochs": 15, **params}
    return Run(name, kind, None if kind == "workspace" else "0" * 40, None, dataset, model, "scratch", params,
               acc, val, seconds)


def shown(rows: list[Run], **kw) -> list[str]:
    ordered = order(rows, **kw)
    runs.mark_changed(ordered)
    return table(ordered)


def name_of(line: str) -> str:
    """The experiment column of a table line (after the `*` mark's column)."""
    return line[2:].split()[0]


# --- the table, on hand-made rows (no DVC) -----------------------------------------------------------


def test_every_line_fits_100_columns_with_long_names_and_many_changed_params():
    many = {f"train.knob_number_{i}": i for i in range(12)} | {"augment.resized_crop_scale": [0.25, 1.0]}
    rows = [row("a-very-long-experiment-name-from-a-grid-search-" + str(i), f"my_own_photos_of_birds_{i % 2}",
                0.5 + i / 100, 0.5, 12345.0, model="tf_efficientnet_lite0_with_a_long_suffix",
                **({k: v + i if isinstance(v, int) else v for k, v in many.items()}), lr=10.0 ** -i)
            for i in range(6)]
    lines = [runs.header(rows, rows), *shown(rows), runs.FOOTER]
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)
    body = lines[2:-1]
    assert all(line.rstrip().endswith("…") for line in body)  # the params were cut, visibly
    assert all("lr=" in line for line in body)  # top-level params first: they survive the cut
    assert len({name_of(line) for line in body}) == len(rows)  # names cut in the middle: still told apart
    assert name_of(body[0]).startswith("a-very-long") and name_of(body[0]).endswith("-5")
    assert len({line[2:].split()[1] for line in body}) == 2  # so are the data sets


def test_order_is_best_first_within_each_data_set_data_sets_by_their_best_rows_unscored_last():
    rows = [row("d1", "digits", 0.90), row("c1", "cifar10", 0.70), row("d2", "digits", 0.97),
            row("none", "digits"), row("c2", "cifar10", 0.80), row("f1", "flowers", 0.95),
            row("ws", "digits", 0.97, kind="workspace")]
    ordered = order(rows)
    assert [r.name for r in ordered] == ["d2", "ws", "d1", "f1", "c2", "c1", "none"]
    assert [r.name for r in ordered if r.best] == ["d2", "f1", "c2"]  # equal accuracy: the experiment, not ws
    lines = shown(rows)
    marked = [name_of(line) for line in lines[1:] if line.startswith("*")]
    assert marked == ["d2", "f1", "c2"]


def test_ties_on_test_accuracy_are_broken_by_validation_accuracy():
    assert [r.name for r in order([row("a", acc=0.9, val=0.8), row("b", acc=0.9, val=0.85)])] == ["b", "a"]


def test_n_keeps_the_best_rows_of_each_data_set():
    rows = [row(f"d{i}", "digits", i / 10) for i in range(5)] + [row(f"c{i}", "cifar10", i / 10) for i in range(3)]
    assert [r.name for r in order(rows, per_dataset=2)] == ["d4", "d3", "c2", "c1"]


def test_unknown_training_time_is_a_dash_and_known_ones_are_readable():
    lines = shown([row("fast", acc=0.9, seconds=41.2), row("slow", acc=0.8, seconds=185),
                   row("long", acc=0.7, seconds=7300), row("unknown", acc=0.6)])
    header = lines[0]
    start = header.index("time") + len("time")  # the time column is right-aligned under its header
    times = {name_of(line): line[:start].split()[-1] for line in lines[1:]}
    assert times == {"fast": "41s", "slow": "3m05s", "long": "2h01m", "unknown": "–"}


def test_only_params_that_differ_are_shown_and_not_those_in_their_own_columns():
    rows = [row("a", acc=0.9, lr=0.001, model="resnet18", **{"train.optimizer": "sgd"}),
            row("b", acc=0.8, lr=0.01, **{"train.optimizer": "sgd"})]
    lines = shown(rows)
    assert lines[1].rstrip().endswith("lr=0.001") and lines[2].rstrip().endswith("lr=0.01")
    assert "optimizer" not in "\n".join(lines) and "model=" not in "\n".join(lines) and "epochs=" not in lines[1]
    assert runs.mark_changed(rows) == ["lr"]


def test_nested_keys_shown_by_their_last_part_unless_two_share_it():
    rows = [row("a", acc=0.9, **{"train.optimizer": "sgd", "train.dropout": 0.1, "augment.dropout": 0.2}),
            row("b", acc=0.8, **{"train.optimizer": "adamw", "train.dropout": 0.3, "augment.dropout": 0.4})]
    assert runs._short_keys(runs.mark_changed(rows)) == {
        "train.optimizer": "optimizer", "train.dropout": "train.dropout", "augment.dropout": "augment.dropout"}
    assert shown(rows)[1].split("  ")[-1].startswith("optimizer=sgd train.dropout=0.1")


@pytest.mark.parametrize("params, strategy", [
    ({"pretrained": False, "weights": None, "finetune": "linear_probe"}, "scratch"),
    ({"pretrained": True, "weights": None, "finetune": "linear_probe"}, "linear_probe"),
    ({"pretrained": False, "weights": "weights/prev.pt", "finetune": "two_phase"}, "two_phase"),
])
def test_strategy_is_scratch_without_weights_else_the_finetune_value(params, strategy):
    assert runs._strategy(params) == strategy


def test_a_folder_data_set_shows_its_folder_name():
    assert runs._dataset({"dataset": "folder", "data_dir": "data/flowers"}) == "flowers"
    assert runs._dataset({"dataset": "cifar10", "data_dir": "data/raw"}) == "cifar10"


def test_dvc_states_become_rows_with_params_metrics_and_a_running_experiment_unscored():
    """DVC's own structures (as `Repo.experiments.show` returns them), made by hand."""
    from dvc.repo.experiments.serialize import ExpExecutor, ExpRange, ExpState, SerializableExp

    def state(rev: str, params: dict, accuracy: float | None, name: str | None = None) -> ExpState:
        metrics = {"metrics/eval.json": {"data": {"accuracy": accuracy}}} if accuracy is not None else {}
        return ExpState(rev, name, SerializableExp(rev, params={"params.yaml": {"data": params}}, metrics=metrics))

    base = {"dataset": "folder", "data_dir": "data/flowers", "model": "resnet18", "pretrained": True, "weights": None,
            "finetune": "linear_probe", "lr": "auto", "train": {"optimizer": "adamw"}}
    baseline = state("a" * 40, base, 0.8, name="main")
    baseline.experiments = [
        ExpRange([state("b" * 40, base | {"lr": 0.01}, 0.9)], name="higher-lr"),
        ExpRange([state("c" * 40, base, 0.95)], executor=ExpExecutor("running"), name="busy")]
    rows = runs._rows(state("workspace", base, 0.8)) + runs._rows(baseline)
    assert [(r.name, r.kind, r.test_accuracy, r.running) for r in rows] == [
        ("workspace", "workspace", 0.8, False), ("main", "baseline", 0.8, False),
        ("higher-lr", "experiment", 0.9, False), ("busy", "experiment", None, True)]
    assert {(r.dataset, r.model, r.strategy) for r in rows} == {("flowers", "resnet18", "linear_probe")}
    assert rows[2].baseline == "a" * 40 and rows[2].params["train.optimizer"] == "adamw"
    lines = shown(rows)
    assert name_of(lines[-1]) == "busy" and lines[-1].rstrip().endswith(" running")  # unscored: last, and said why
    assert lines[1].startswith("* higher-lr") and lines[1].rstrip().endswith("lr=0.01")


def test_each_row_shows_what_it_changed_from_its_commit():
    """An experiment against its baseline's params.yaml, the workspace against HEAD's, a commit
    nothing: what was different about it, however many keys differ elsewhere in the table."""
    base = {"lr": "auto", "epochs": 15, "augment.random_crop": True}
    rows = [row("main", acc=0.99, kind="baseline", **base), row("no-crop", acc=1.0, **base | {"epochs": 10,
            "augment.random_crop": False}), row("lower-lr", acc=0.98, **base | {"lr": 0.001}),
            row("workspace", acc=0.97, kind="workspace", **base | {"lr": 0.01})]
    rows[0].rev = "h" * 40
    for r in rows[1:]:
        r.baseline = "h" * 40
    lines = {name_of(line): line.rstrip() for line in shown(rows)[1:]}
    assert lines["no-crop"].endswith("  epochs=10 random_crop=false")
    assert lines["lower-lr"].endswith("  lr=0.001") and "epochs" not in lines["lower-lr"]
    assert lines["workspace"].endswith("  lr=0.01") and lines["main"].endswith("–")


# --- training times from MLflow -----------------------------------------------------------------------


def test_training_times_come_from_one_search_of_the_mlflow_store(tmp_path: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("image-classification")
    base = "b" * 40
    for name, baseline, seconds in (("lower-lr", base, 30.0), ("lower-lr", base, 41.0),  # the newer one counts
                                    ("other-base", "c" * 40, 99.0), ("no-time", base, None)):
        made = client.create_run(experiment, tags={"dvc_exp_name": name, "dvc_baseline_rev": baseline})
        if seconds is not None:
            client.log_metric(made.info.run_id, "train/seconds", seconds)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.pt").write_bytes(b"the workspace's checkpoint")
    made = client.create_run(experiment, tags={"checkpoint_sha256": file_sha256(tmp_path / "models/model.pt")})
    client.log_metric(made.info.run_id, "train/seconds", 7.0)
    rows = [row("lower-lr"), row("other-base"), row("no-time"), row("never-logged"), row("workspace", kind="workspace")]
    for r in rows[:4]:
        r.baseline = base
    assert runs.add_train_seconds(rows, tmp_path) is None
    # no metrics/train_timing.json: the workspace's time is that of the run which made its checkpoint
    assert [r.train_seconds for r in rows] == [41.0, None, None, None, 7.0]


def test_a_missing_or_unreachable_store_is_a_note_and_dashes(tmp_path: Path, monkeypatch):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.pt").write_bytes(b"the workspace's model")
    sha = hashlib.sha256(b"the workspace's model").hexdigest()
    (tmp_path / "metrics/train_timing.json").write_text(json.dumps({"train_seconds": 12.5, "checkpoint_sha256": sha}))
    for uri, problem in ((f"sqlite:///{tmp_path / 'none.db'}", "no MLflow store"),
                         ("http://127.0.0.1:9", "cannot reach the MLflow tracking server")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        rows = [row("exp", acc=0.9), row("workspace", acc=0.9, kind="workspace")]
        note = runs.add_train_seconds(rows, tmp_path)
        assert note.startswith("time –: ") and problem in note
        assert [r.train_seconds for r in rows] == [None, 12.5]  # the workspace's own file still counts
    assert not (tmp_path / "none.db").exists()  # reading never creates a store
    (tmp_path / "models/model.pt").write_bytes(b"another model, restored by DVC")  # the file is not its time
    rows = [row("workspace", acc=0.9, kind="workspace")]
    runs.add_train_seconds(rows, tmp_path)
    assert rows[0].train_seconds is None


# --- the command, outside a project and on a project without runs -----------------------------------------


def test_outside_a_dvc_repository_one_line_and_exit_2(tmp_path: Path):
    proc = run(["python", "-m", "pipeline", "runs"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {tmp_path.resolve()} is not inside a DVC repository; run " \
                                  "`python -m pipeline runs` in the project's folder"


def test_no_experiments_one_line(tmp_path: Path):
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "init"]):
        run(cmd, tmp_path)
    with pytest.raises(UserError, match="no experiments yet"):
        runs.show(root=tmp_path)


# --- the real command on real DVC experiments (slow) ----------------------------------------------------

EXPERIMENTS = {"one-epoch": ["-S", "epochs=1"], "low-lr": ["-S", "epochs=1", "-S", "lr=0.0003"]}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Path:
    """The working tree (tracked and new files) in a fresh git repo with tiny params, and two
    experiments of one epoch each, up to evaluate (export is not what this checks)."""
    dest = make_project(tmp_path_factory.mktemp("runs") / "project")
    for name, sets in EXPERIMENTS.items():
        run(["dvc", "exp", "run", *sets, "--name", name, "evaluate"], dest)
    return dest


def dvc_accuracies(project: Path) -> dict[str, float]:
    """Test accuracy of the workspace, each baseline and each experiment, as `dvc exp show --json`
    reports it (the ground truth the table is checked against)."""
    def accuracy(state: dict) -> float:
        return state["data"]["metrics"]["metrics/eval.json"]["data"]["accuracy"]

    out: dict[str, float] = {}
    for state in json.loads(run(["dvc", "exp", "show", "--json"], project).stdout):
        out[state["name"] or state["rev"]] = accuracy(state)
        out.update({exp["name"]: accuracy(exp["revs"][0]) for exp in state.get("experiments") or []})
    return out


@pytest.mark.slow
def test_runs_lists_every_experiment_best_first_with_mlflow_times(experiments: Path):
    proc = run(["python", "-m", "pipeline", "runs"], experiments)
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, proc.stdout
    assert lines[0].startswith("4 runs (2 experiments, 1 baseline, workspace)") and "dvc exp apply" in lines[-1]
    body = lines[2:-1]
    by_name = {name_of(line): line for line in body}
    accuracies = dvc_accuracies(experiments)
    assert set(by_name) == set(accuracies) == {"workspace", "main", *EXPERIMENTS}, proc.stdout
    for name, accuracy in accuracies.items():
        assert f"{accuracy:.4f}" in by_name[name]
    in_order = [accuracies[name_of(line)] for line in body]
    assert in_order == sorted(in_order, reverse=True)  # best first
    best = max(accuracies.values())
    marked = [name_of(line) for line in body if line.startswith("*")]
    assert len(marked) == 1 and accuracies[marked[0]] == best and marked[0] == name_of(body[0])
    for name in (*EXPERIMENTS, "workspace"):  # from the project's mlflow.db; the workspace's timing file
        assert re.search(r"\s\d+s(\s|$)", by_name[name]), by_name[name]
    assert by_name["main"].rstrip().endswith(" –")  # the baseline was never trained here: no time, nothing changed
    # what each changed from its commit, and nothing else
    assert by_name["low-lr"].rstrip().endswith("  epochs=1 lr=0.0003") and by_name["one-epoch"].rstrip().endswith("  epochs=1")


@pytest.mark.slow
def test_runs_json_and_an_unreachable_store(experiments: Path):
    unreachable = "http://127.0.0.1:9"
    proc = run(["python", "-m", "pipeline", "runs", "--json", "-n", "1"], experiments, MLFLOW_TRACKING_URI=unreachable)
    rows = json.loads(proc.stdout)
    assert len(rows) == 1 and rows[0]["dataset"] == "digits" and rows[0]["best"]
    assert rows[0]["test_accuracy"] == max(dvc_accuracies(experiments).values())
    assert f"cannot reach the MLflow tracking server {unreachable}" in proc.stderr
    out = run(["python", "-m", "pipeline", "runs"], experiments, MLFLOW_TRACKING_URI=unreachable).stdout
    assert f"time –: cannot reach the MLflow tracking server {unreachable}" in out
    low_lr = next(line for line in out.splitlines() if name_of(line) == "low-lr")
    assert " – " in low_lr


def test_the_workspace_row_is_described_by_the_params_that_made_its_outputs(tmp_path: Path):
    """After `dvc exp run -S ...` and `git checkout params.yaml` (as the README says), the
    workspace holds the experiment's outputs beside the committed params.yaml: its row takes the
    params the check stage ran with (dvc.lock), not params.yaml's."""
    import yaml

    made_with = {"dataset": "folder", "data_dir": "data/flowers", "model": "resnet18", "pretrained": True,
                 "weights": None, "finetune": "linear_probe", "lr": 0.01, "train": {"optimizer": "sgd"}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"check": {"params": {"params.yaml": made_with}}}}))
    workspace = row("workspace", acc=0.9, kind="workspace")  # params.yaml: digits, original, lr auto
    runs._params_of_its_outputs(workspace, tmp_path)
    assert (workspace.dataset, workspace.model, workspace.strategy) == ("flowers", "resnet18", "linear_probe")
    assert workspace.params["lr"] == 0.01 and workspace.params["train.optimizer"] == "sgd"
    untouched = row("workspace", acc=0.9, kind="workspace")
    runs._params_of_its_outputs(untouched, tmp_path / "nowhere")  # no lock file: params.yaml's, as read
    assert untouched.model == "original"
