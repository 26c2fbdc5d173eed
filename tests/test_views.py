"""What people look at to compare runs: `dvc plots show` offline with readable templates, the
MLflow run's description and store checks, the report in its two forms."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import dvcplots, runview
from pipeline.evaluation.report import number, report_blocks, setting, to_html, to_markdown
from tests.conftest import ROOT, run, set_params

# --- dvc plots ------------------------------------------------------------------------------


def test_committed_templates_are_the_derived_ones():
    """.dvc/plots/*.json are written by pipeline/dvcplots.py from dvc-render's own templates."""
    committed = {p.stem: p.read_text() for p in (ROOT / dvcplots.TEMPLATE_DIR).glob("*.json")}
    assert committed == {name: dvcplots.template_text(c) for name, c in dvcplots.templates().items()}, \
        "re-make them: python -m pipeline.dvcplots"


def test_templates_make_epochs_whole_and_zero_cells_blank():
    epochs = json.dumps(dvcplots.epochs_template())
    assert '"tickMinStep": 1' in epochs and '"format": "d"' in epochs
    assert '"type": "log"' in json.dumps(dvcplots.epochs_template(log_y=True)) and '"type": "log"' not in epochs
    confusion = dvcplots.confusion_template(normalized=False)
    layers = confusion["spec"]["layer"]
    assert all("datum.xy_count > 0" in layer["transform"][0]["filter"] for layer in (layers[0], layers[1], layers[-1]))
    assert [layers[0]["encoding"]["color"]["scale"]["scheme"], layers[1]["encoding"]["color"]["scale"]["scheme"]] == [
        "blues", "oranges"]  # correct and wrong cells in scales of their own


def history_and_predictions(folder: Path) -> None:
    (folder / "metrics").mkdir(exist_ok=True)
    pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.6, 0.5],
                  "train_accuracy": [0.5, 0.8, 0.9], "val_accuracy": [0.4, 0.7, 0.8]}).to_csv(
        folder / "metrics/train_history.csv", index=False)
    actual = ["cat"] * 5 + ["dog"] * 5
    pd.DataFrame({"actual": actual, "predicted": ["cat"] * 4 + ["dog"] * 6}).to_csv(
        folder / "metrics/predictions.csv", index=False)


def test_dvc_plots_show_draws_offline(project: Path):
    """The real `dvc plots show`: a page with vega inlined (no CDN), every plot a valid
    vega-lite spec with axis titles, rendered here by vl-convert (no browser, no network)."""
    import vl_convert

    history_and_predictions(project)
    run(["python", "-c", "from pipeline.dvcplots import ensure_page; ensure_page()"], project)
    run(["dvc", "plots", "show", "-o", "out"], project)
    page = (project / "out/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src" not in page and "vegaEmbed" in page
    shown = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    specs = {name: plots[0]["content"] for name, plots in shown.items() if plots and plots[0]["type"] == "vega"}
    assert len(specs) == 5, list(specs)
    for name, spec in specs.items():
        svg = vl_convert.vegalite_to_svg(spec, vl_version=dvcplots.VEGA_LITE)
        assert "<svg" in svg and ("epoch" in svg or "predicted class" in svg), name
    loss = next(s for n, s in specs.items() if n.startswith("Loss per epoch (train"))
    assert "cross-entropy loss" in json.dumps(loss)


def test_offline_page_is_rewritten_only_when_stale(tmp_path: Path):
    page = tmp_path / "page.html"
    dvcplots.ensure_page(page)
    assert dvcplots.page_is_current(page) and "{plot_divs}" in page.read_text()
    mtime = page.stat().st_mtime_ns
    dvcplots.ensure_page(page)
    assert page.stat().st_mtime_ns == mtime
    page.write_text("<!DOCTYPE html>\n<!-- vega bundle of vl-convert-python 0.0.1, -->\n{plot_divs}")
    dvcplots.ensure_page(page)
    assert dvcplots.page_is_current(page)


# --- the MLflow run ---------------------------------------------------------------------------


def test_run_name_and_description_name_the_params_that_differ_from_the_commit(project: Path, monkeypatch):
    from pipeline.core.params import load_params

    monkeypatch.chdir(project)
    set_params(project, lr=0.01, **{"train.optimizer": "sgd", "dataset": "folder", "data_dir": "data/flowers"})
    params = load_params(check_models=False)
    changed = runview.changed_params(params.flat(), runview.committed_params())
    assert changed == {"dataset": "folder", "data_dir": "data/flowers", "lr": 0.01, "train.optimizer": "sgd"}
    who = runview.run_identity(params, lr=0.01, n_params=5, n_classes=2, n_train=1234, image_size=224,
                               data_hash="abc")
    # the folder's own name, not "folder"; the DVC name is a tag; data set and model are in the name already
    assert who.name == "original · flowers · lr=0.01 train.optimizer=sgd"
    assert who.experiment == "flowers" and who.tags["dataset"] == "flowers" and who.tags["data_dir"] == "data/flowers"
    assert who.note.startswith("**original** on **flowers** (2 classes, 1,234 training images at 224 px): from scratch")
    assert "`lr=0.01`, `train.optimizer=sgd`" in who.note
    assert "`data/flowers`" in who.experiment_tags["mlflow.note.content"]
    view = json.loads(who.experiment_tags[f"mlflow.sharedViewState.{runview.SHARED_VIEW}"])
    assert view["orderByKey"] == "metrics.`test/accuracy`" and view["orderByAsc"] is False
    assert "metrics.`test/accuracy`" in view["selectedColumns"]
    assert "not a git checkout" in runview.headline(model="m", dataset="d", how="full", n_classes=2, n_train=1,
                                                    image_size=8, lr=1e-3, changed=None)
    assert runview.run_name("m", "d", {"weights": "/srv/weights/lite0.pth", "finetune": "partial"}) == (
        "m · d · weights=lite0.pth finetune=partial")
    long = runview.run_name("resnet18", "digits", {f"train.key_{i}": i for i in range(20)})
    assert len(long) == 90 and long.endswith("…")


def test_metric_names_pair_train_and_val_and_put_test_before_train():
    """The MLflow UI draws a chart section per name prefix, sorted: loss/train beside loss/val,
    accuracy/train beside accuracy/val, then the headline test figures, then training's."""
    row = {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7, "lr": 0.1,
           "images_per_second": 99.0, "trainable_params": 10}
    curves = runview.epoch_metrics(row)
    assert set(curves) == {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "schedule/lr"}
    others = (runview.test_metrics({"accuracy": 0.9, "n_test": 10, "precision_weighted": 0.8})
              | runview.train_metrics({"best_val_accuracy": 0.7, "parameters": 3}, {"threads": 2, "train_seconds": 1.0}))
    assert set(others) == {"test/accuracy", "train/best_val_accuracy", "train/seconds"}
    sections = sorted({k.rsplit("/", 1)[0] for k in curves | others})
    assert sections == ["accuracy", "loss", "schedule", "test", "train"]


def test_store_of_a_moved_repository_is_one_line(project: Path, tmp_path: Path):
    """An experiment whose artifacts live outside the repository (it was copied with its
    mlflow.db) stops the check stage in one line, before any output is touched."""
    elsewhere = tmp_path / "old-clone" / "mlartifacts"
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    client.create_experiment("digits", artifact_location=elsewhere.as_uri())
    proc = run(["python", "-m", "stages.check"], project, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "outside this repository" in errors[0] and str(elsewhere) in errors[0] and "mv mlflow.db" in errors[0]
    assert not (project / "data/resolved").exists()


# --- the report -------------------------------------------------------------------------------


def test_numbers_are_tidy():
    assert [number(v) for v in (0.98765, 168.5651, 12345.6, 1e-5, 0.0, 7, True)] == [
        "0.9877", "168.5651", "12,346", "1e-05", "0.0000", "7", "yes"]
    assert [setting(v) for v in (0.003, 1e-5, False, None, "sgd", [0.08, 1.0])] == [
        "0.003", "1e-05", "false", "null", "`sgd`", "[0.08, 1]"]


def test_report_html_is_one_file_with_its_pictures(tmp_path: Path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cm.png")
    ckpt = {"arch": "resnet18", "classes": ["a", "b"], "preprocessing": {"image_size": 32},
            "params": {"dataset": "folder", "lr": 1e-5, "pretrained": False}}
    per_class = pd.DataFrame({"class": ["a", "b"], "precision": [1.0, 0.5], "recall": [0.5, 1.0],
                              "f1": [0.667, 0.667], "support": [2, 1]})
    blocks = report_blocks(ckpt=ckpt, run={"run_id": "r1", "experiment": "e"}, train_summary={"lr": 1e-5},
                           metrics={"accuracy": 2 / 3, "n_test": 3}, per_class=per_class,
                           pictures=[("Confusion matrix", tmp_path / "cm.png")],
                           context={"date": "2026-11-29 10:00 UTC", "commit": "abc1234", "DVC experiment": "x"})
    md, html = to_markdown(blocks, tmp_path / "report.md"), to_html(blocks)
    assert "![Confusion matrix](cm.png)" in md and "| lr | 1e-05 |" in md and "| pretrained | false |" in md
    assert "date `2026-11-29 10:00 UTC`; commit `abc1234`; DVC experiment `x`; MLflow run `r1`" in md
    assert 'src="data:image/png;base64,' in html and "cm.png" not in html and "<code>r1</code>" in html
    assert "http" not in html  # nothing to fetch


def test_git_keeps_the_report_and_its_pictures():
    """report.md is committed with its pictures (DVC outputs with cache: false), so its links
    resolve on GitHub; the HTML twin (pictures inlined) is not."""
    ignored = subprocess.run(["git", "check-ignore", "metrics/report.md", "metrics/confusion_matrix.png",
                              "metrics/gradcam.png", "metrics/report.html"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == ["metrics/report.html"]


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_pictures_are_uncached_plots(stage):
    import yaml

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["plots"]
    assert plots and all(isinstance(p, dict) and next(iter(p.values())) == {"cache": False} for p in plots)


MAKE_BESIDE = """
import os, signal, sys
from pipeline import mlstore
mlstore.make_store_beside()
child = mlstore._maker
assert child is not None and child.pid != os.getpid()
if sys.argv[1] == "kill":  # killed half-way (still importing MLflow, or migrating): connect makes it
    os.kill(child.pid, signal.SIGKILL)
mlstore.connect().search_experiments()
assert mlstore._maker is None and child.exitcode == (-9 if sys.argv[1] == "kill" else 0), child.exitcode
mlstore.make_store_beside()
assert mlstore._maker is None  # the store is there: no child
"""


@pytest.mark.parametrize("how", ["whole", "kill"])
def test_a_new_store_is_made_beside_the_stage_and_connect_waits_for_it(tmp_path: Path, how: str):
    """train makes a new SQLite store in a child process while it builds its model
    (`mlstore.make_store_beside`): `connect` waits for the child and finishes what it left,
    so the store is whole and usable either way, with no half-made file left."""
    import os
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MAKE_BESIDE, how], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert MlflowClient(uri).get_experiment_by_name("Default") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db-init.lock"]


TAG_AT_ONCE = """
import os, sys, time
from pathlib import Path
import mlflow
from pipeline import tracking
folder = Path(sys.argv[1])
(folder / f"ready-{os.getpid()}").touch()
while not (folder / "go").exists():  # all at once
    time.sleep(0.002)
for i in range(30):
    tracking.use_experiment(mlflow, f"exp{i}", {tracking.NOTE: "a note", "dataset_source": "folder"})
"""


def test_runs_that_start_at_once_each_set_their_experiments_tags(tmp_path: Path):
    """Parallel queued runs (`dvc queue start -j 2`) each find a new experiment's tags missing and
    each add them: MLflow's SQLite store refuses the later insert (UNIQUE constraint failed), which
    had stopped a queued train. Four processes, 30 new experiments each at the same moment
    (without the handling, a process failed in each of 5 tries): all end well, every tag is set."""
    import os
    import sys
    import time

    from pipeline import mlstore, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    mlstore._create_sqlite_store_once(uri)  # the store made once, as train's connect() does
    procs = [subprocess.Popen([sys.executable, "-c", TAG_AT_ONCE, str(tmp_path)], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-800:] for e in errors)
    client = MlflowClient(uri)
    for i in range(30):
        tags = client.get_experiment_by_name(f"exp{i}").tags
        assert tags[tracking.NOTE] == "a note" and tags["dataset_source"] == "folder"
