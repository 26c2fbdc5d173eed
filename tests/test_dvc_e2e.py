"""The real `dvc` CLI on a copy of the project in a temporary git repo (tiny params):
repro, nothing-changed repro, a fresh clone's first run, `exp run -S lr=...`, and a queue that
logs into the main store."""
import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import clean_env, run, set_params

pytestmark = pytest.mark.slow


def runs_by_exp(project: Path, experiment: str = "digits") -> dict:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


STAGES = ["download", "check", "prepare", "train", "evaluate", "export", "report"]


def ends_with_the_block(out: str, run_id: str) -> None:
    """The end of a run's output says what came out and where to look."""
    block = out[out.index("test accuracy"):]
    assert "metrics/report.html" in block and f"runs/{run_id}?workflowType=machine_learning" in block, out[-2000:]
    assert "runs?viewStateShareKey=best-first&workflowType=machine_learning" in block
    assert "python -m pipeline runs" in block


def test_repro_then_experiments(project: Path, tmp_path: Path):
    # 1. dvc repro runs every stage and one complete MLflow run holds params, metrics, artifacts
    out = run(["dvc", "repro"], project).stdout
    assert stages_run(out) == STAGES
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["accuracy"] > 0.8
    assert json.loads((project / "metrics/export.json").read_text())["top1_agreement"] == 1.0
    client, runs = runs_by_exp(project)
    assert len(runs) == 1
    run0 = runs[0]
    assert run0.data.params["lr"] == "0.003" and run0.data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"], abs=5e-5)
    assert run0.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert {"confusion_matrix.png", "learning_curves.png", "augmented_samples.png", "onnx"} <= {
        a.path for a in client.list_artifacts(run0.info.run_id)}
    assert [m.step for m in client.get_metric_history(run0.info.run_id, "loss/train")] == [1, 2]
    ends_with_the_block(out, run0.info.run_id)

    # 2. nothing changed: no stage runs, dvc status says so, dvc.lock is untouched
    lock = (project / "dvc.lock").read_text()
    started = time.perf_counter()
    out = run(["dvc", "repro"], project).stdout
    assert stages_run(out) == [] and "Data and pipelines are up to date" in out, out
    assert (project / "dvc.lock").read_text() == lock
    assert time.perf_counter() - started < 30  # the target is ≤ 2 s; generous for a loaded CI box
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout
    # dvc plots show draws the confusion matrix from one actual/predicted row per test image
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    confusion = plots["Confusion matrix, test split (counts; correct in blue, wrong in orange)"][0]
    values = confusion["content"]["data"]["values"]
    assert len(values) == evaluation["n_test"] and {"actual", "predicted"} <= set(values[0])
    assert {"Loss per epoch (train and validation)", "Accuracy per epoch (train and validation)",
            "metrics/confusion_matrix.png"} <= set(plots)

    # the data params re-run prepare (and what follows): DVC sees data.group_by and data.leakage change
    params_yaml = (project / "params.yaml").read_text()
    set_params(project, **{"data.group_by": "([^/]+)$", "data.leakage": "error"})
    changed = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert changed["prepare"] == [{"changed deps": {"params.yaml": {"data": "modified"}}}], changed
    (project / "params.yaml").write_text(params_yaml)

    # 3. a fresh clone of the results: train re-makes the same model.pt, DVC skips evaluate, and the
    # new store's one run still holds the test figures, the model and the report, which names it
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "results"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    out = run(["dvc", "repro"], clone).stdout
    assert "Stage 'evaluate' didn't change, skipping" in out and "train" in stages_run(out), out
    assert stages_run(out)[-1] == "report"
    client, runs = runs_by_exp(clone)
    assert len(runs) == 1 and runs[0].data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"], abs=5e-5)
    assert {"report.html", "confusion_matrix.png", "eval.json"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert client.search_logged_models([runs[0].info.experiment_id])
    assert f"MLflow run `{runs[0].info.run_id}`" in (clone / "metrics/report.md").read_text()
    ends_with_the_block(out, runs[0].info.run_id)
    assert "(committed" in out and ": same)" in out  # the same model as the commit's

    # an edit of train's code that leaves the weights as they were: train runs, and so does what
    # follows it (the checkpoint records what made it), so the report completes train's new run
    loop = clone / "pipeline/training/loop.py"
    loop.write_text(loop.read_text() + "\n# an edit that changes no number\n")
    out = run(["dvc", "repro"], clone).stdout
    assert "train" in stages_run(out) and stages_run(out)[-1] == "report", out
    client, runs = runs_by_exp(clone)
    assert len(runs) == 2 and all("test/accuracy" in r.data.metrics for r in runs), [r.data.metrics for r in runs]

    # 4. dvc exp run -S lr=0.001 works as typed and is recorded with lr=0.001, named for what changed
    out = run(["dvc", "exp", "run", "-S", "lr=0.001", "--name", "lower-lr"], project).stdout
    _, runs = runs_by_exp(project)
    by_name = {r.data.tags.get("dvc_exp_name"): r for r in runs}
    assert by_name["lower-lr"].data.params["lr"] == "0.001"
    assert by_name["lower-lr"].info.run_name == "original · digits · lr=0.001"
    ends_with_the_block(out, by_name["lower-lr"].info.run_id)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    assert "lower-lr" in json.dumps(shown)


def start_queue(project: Path, workers: int) -> None:
    """`dvc queue start -j N` with its output in a file, not a pipe. DVC (dvc-task 0.40) spawns each
    worker from a forked `multiprocessing.Process` that keeps the caller's stdout and stderr open
    until the worker exits, so a captured `dvc queue start` returns only when the whole queue has
    run: on a slow CI machine that was past the 600-s timeout. A terminal or a file does not wait,
    so this one returns once the workers are spawned (seconds; 120 s is the limit)."""
    log = project.parent / "queue-start.log"  # outside the repository: not part of any experiment
    with log.open("w") as out:
        proc = subprocess.run(["dvc", "queue", "start", "-j", str(workers)], check=False, cwd=project,
                              env=clean_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=120)
    assert proc.returncode == 0, log.read_text()


def test_parallel_queue_records_every_run_in_the_main_store(project: Path):
    """Two queued experiments run at the same time (`dvc queue start -j 2`), both finding no
    mlflow.db: two complete runs in the default SQLite store, nothing lost to "database is locked",
    nothing in the temp copies. (Two, not four: the race is between the workers running at once;
    a second pair would meet a store that exists and cost ~2.5 min more.)"""
    lrs = ["0.002", "0.004"]
    for lr in lrs:
        run(["dvc", "exp", "run", "--queue", "-S", f"lr={lr}", "--name", f"q-lr-{lr[2:]}"], project)
    start_queue(project, workers=2)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    logs = "\n".join(run(["dvc", "queue", "logs", f"q-lr-{lr[2:]}"], project, check=False).stdout for lr in lrs)
    run(["dvc", "queue", "stop", "--kill"], project, check=False)
    assert "Failed" not in status and "database is locked" not in logs, status + logs[-4000:]
    client, runs = runs_by_exp(project)
    by_name = {r.data.tags.get("dvc_exp_name"): r for r in runs}
    assert len(runs) == len(lrs) and set(by_name) == {f"q-lr-{lr[2:]}" for lr in lrs}, status
    for lr in lrs:
        r = by_name[f"q-lr-{lr[2:]}"]
        assert r.data.params["lr"] == lr and r.info.status == "FINISHED"
        # complete: every stage logged into it
        assert {"test/accuracy", "test/f1_macro", "train/best_val_accuracy"} <= set(r.data.metrics)
        # its artifacts live in the main repo (not in the deleted temporary copy it ran in)
        assert r.info.artifact_uri.startswith((project / "mlartifacts").as_uri()), r.info.artifact_uri
        assert {"eval.json", "report.md", "confusion_matrix.png"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    models = client.search_logged_models([runs[0].info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in runs)
    for m in models:
        assert m.artifact_location.startswith((project / "mlartifacts").as_uri())
        assert (Path(m.artifact_location.removeprefix("file://")) / "model.onnx").stat().st_size > 0
    # nothing was written into the (deleted) temporary copies: the store is the main repo's
    assert (project / "mlflow.db").exists() and not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
    # dvc exp show lists them with the same headline metrics
    shown = run(["dvc", "exp", "show", "--csv", "--only-changed"], project).stdout
    for lr in lrs:
        assert f"q-lr-{lr[2:]}" in shown
    assert "accuracy" in shown.splitlines()[0]


def write_messy_folder(root: Path) -> None:
    """Three classes of 12 distinguishable images each in a pre-split layout, with bad files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, count in (("train", 12), ("valid", 4)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-25, 26, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'JPG'}")
    (root / "train" / "red" / "empty.png").write_bytes(b"")
    (root / "train" / "green" / "fake.jpg").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "yellow").mkdir()  # an empty class folder: ignored, reported


def test_folder_dataset_end_to_end(project: Path, tmp_path: Path):
    images = tmp_path / "images"
    write_messy_folder(images)
    run(["dvc", "exp", "run", "-S", "dataset=folder", "-S", f"data_dir={images}", "-S", "epochs=3",
         "--name", "folder-exp", "evaluate"], project)  # up to evaluate: export is not what this checks
    # a whole run of a folder starts with download (nothing else orders it before check): its cold
    # start runs beside the warm server's import of torch, which check waits for
    out = run(["dvc", "repro", "--dry", "-f"], project).stdout
    assert stages_run(out)[:2] == ["download", "check"], out
    report = json.loads((project / "metrics/data_card.json").read_text())
    assert report["per_split"]["val"] == 12 and report["images_used"] == 48
    assert report["skipped_by_reason"].get("empty file") == 1
    assert sum(report["skipped_by_reason"].values()) == report["files_skipped"] >= 2
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["n_test"] > 0 and evaluation["accuracy"] > 0.5
    _, runs = runs_by_exp(project, "images")  # the folder's own name: the experiment, the data set, the run's name
    folder_run = {r.data.tags.get("dvc_exp_name"): r for r in runs}["folder-exp"]
    assert folder_run.data.tags["dataset"] == "images" and folder_run.data.tags["data_dir"] == str(images)
    assert folder_run.info.run_name.startswith("original · images")
    assert report["dataset"] == {"name": "images", "source": "folder", "path": str(images),
                                 "hash": json.loads((project / "data/prepared/meta.json").read_text())["content_hash"]}
    assert report["duplicates"]["threshold"] == 0.9 and "## Duplicates and leakage" in (project / "metrics/data_card.md").read_text()
    assert "# Data card: images" in (project / "metrics/data_card.md").read_text()


def stages_run(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


def test_same_inputs_same_bytes_bad_params_touch_nothing_and_every_knob_reruns_train(project: Path, monkeypatch):
    """dvc repro -f leaves dvc.lock byte-identical (every output, cached or not, is the same
    file); bad params stop `dvc exp run` before any output is touched (tests/test_faults.py's
    BAD); changing the weights, finetune, or the bytes of the weights file, re-runs train. (The
    knob runs target `train`: what runs after it is not what they check, and costs ~1 min a run.)"""
    from tests.test_faults import bad_params_touch_nothing

    run(["dvc", "repro"], project)
    lock = (project / "dvc.lock").read_text()
    run(["dvc", "repro", "-f"], project)
    assert (project / "dvc.lock").read_text() == lock
    bad_params_touch_nothing(project, monkeypatch)
    monkeypatch.undo()

    # fine-tune from our own checkpoint (a copy of it, inside the repo): its recorded preprocessing comes along
    (project / "weights").mkdir()
    (project / "weights/prev.pt").write_bytes((project / "models/model.pt").read_bytes())
    out = run(["dvc", "exp", "run", "-S", "weights=weights/prev.pt", "train"], project).stdout
    assert {"prepare", "train"} <= set(stages_run(out))
    assert "the preprocessing recorded in the checkpoint weights/prev.pt" in out

    out = run(["dvc", "exp", "run", "-S", "finetune=linear_probe", "train"], project).stdout
    assert "train" in stages_run(out) and "prepare" not in stages_run(out)
    assert "probe_l2" in json.loads((project / "metrics/train.json").read_text())
    # the same path, other bytes: train runs again
    import torch

    ckpt = torch.load(project / "weights/prev.pt", weights_only=True)
    ckpt["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, project / "weights/prev.pt")
    out = run(["dvc", "repro", "train"], project).stdout
    assert "train" in stages_run(out)
