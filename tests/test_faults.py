"""Faults and bad input: one line, a non-zero exit, no traceback, no hang, nothing touched.
With the real dvc CLI, real files damaged on purpose, and a tracking server that is not there."""
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import clean_env, run, set_params, train_until_checkpointed


def stage(project: Path, name: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return run(["python", "-m", f"stages.{name}"], project, check=check, **env)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1, lines
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def outputs_digest(project: Path) -> dict[str, str]:
    """sha256 of every file a stage writes (cached or not), by path."""
    files = [p for d in ("models", "metrics", "data/prepared", "data/resolved") for p in (project / d).rglob("*")
             if p.is_file()]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- params, under the real DVC


BAD = [
    (["-S", "lr=-1"], "lr=-1"),
    (["-S", "train.optimizer=adamw2"], "train.optimizer='adamw2'"),
    (["-S", "+epoch=30"], "unknown key 'epoch'"),
    (["-S", "finetune=linear_prob"], "finetune='linear_prob'"),
    (["-S", "weights=/nope.pth"], "no such file"),
    (["-S", "pretrained=yes_please"], "pretrained='yes_please'"),
    (["-S", "train.class_weights=[1,2]"], "10 classes"),
    (["-S", "train.device=cuda"], "no CUDA GPU"),
    (["-S", "data.val_fraction=0"], "data.val_fraction=0"),
    (["-S", "image_size=3"], "image_size=3"),
    (["-S", "batch_size=1"], "batch_size=1"),
    (["-S", "train.warmup_epochs=.inf"], "train.warmup_epochs="),
    (["-S", "mlflow.register_model=bad/name:x"], "mlflow.register_model='bad/name:x'"),
    (["-S", "finetune=linear_probe"], "pretrained: true or weights: PATH"),
    (["-S", "model=levit_128", "-S", "image_size=30"], "cannot take 30 px"),
    (["-S", "tune.storage=postgresql://u:Pl4nted@db/optuna"], "OPTUNA_STORAGE"),
]


# Under the real `dvc exp run`: the values whose reading is DVC's own (`+key` adds a key, a YAML
# list, `.inf`) and the one whose secret must reach no file. Every value of BAD goes through the
# same check stage, in-process below (a `dvc exp run` costs ~8 s, the check itself ~1 s).
UNDER_DVC = ["+epoch=30", "train.class_weights=[1,2]", "train.warmup_epochs=.inf", "tune.storage="]


def bad_params_touch_nothing(project: Path, monkeypatch) -> None:
    """Each value of BAD stops `dvc exp run` in the check stage with one line, touching no output.
    Called by tests/test_dvc_e2e.py on its reproduced project (a `dvc repro` of its own would
    cost a minute more)."""
    from pipeline.core.errors import UserError
    from pipeline.core.params import read_yaml
    from stages import check

    before = outputs_digest(project)
    assert {"models/model.pt", "metrics/eval.json", "metrics/train.json", "data/resolved/weights"} <= set(before)
    monkeypatch.chdir(project)
    for args, words in BAD:
        if any(a.startswith(tuple(UNDER_DVC)) for a in args):
            proc = run(["dvc", "exp", "run", *args], project, check=False)
            line = one_line_error(proc, words)
        else:  # what the check stage says to `dvc exp run` with these values
            set_params(project, **{k: read_yaml(v) for k, v in (a.split("=", 1) for a in args[1::2])})
            with pytest.raises(UserError) as caught:
                check.main()
            line = str(caught.value)
            assert words in line and "\n" not in line, line
        assert outputs_digest(project) == before, (args, line)
        assert "Pl4nted" not in line + (project / "dvc.lock").read_text()
        run(["git", "checkout", "params.yaml"], project)  # what the README says to do after a failed run


# ---------------------------------------------------------------- MLflow trouble


@pytest.fixture
def prepared(project: Path, first_stages) -> Path:
    set_params(project, epochs=2)
    return first_stages(project)


def test_unreachable_tracking_server_is_one_line_within_seconds(prepared: Path):
    started = time.perf_counter()
    proc = stage(prepared, "check", check=False, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert time.perf_counter() - started < 15
    one_line_error(proc, "http://127.0.0.1:9", "mlflow.required: false")
    proc = stage(prepared, "train", check=False, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    one_line_error(proc, "http://127.0.0.1:9")
    assert not (prepared / "models/model.pt").exists()


@pytest.mark.slow
def test_without_required_tracking_the_run_goes_on(prepared: Path):
    set_params(prepared, **{"mlflow.required": False})
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    out = stage(prepared, "train", **env).stdout
    assert "runs without tracking" in out and (prepared / "models/model.pt").stat().st_size > 0
    stage(prepared, "evaluate", **env)
    stage(prepared, "export", **env)
    assert json.loads((prepared / "metrics/export.json").read_text())["top1_agreement"] == 1.0


def test_damaged_mlflow_store_is_one_line(prepared: Path):
    (prepared / "mlflow.db").write_bytes(os.urandom(4096))
    one_line_error(stage(prepared, "check", check=False), "mlflow.db", "damaged", "move it aside")


@pytest.mark.slow
def test_killed_training_resumes_into_the_same_mlflow_run(prepared: Path):
    set_params(prepared, epochs=5)
    stage(prepared, "check")
    proc = train_until_checkpointed(prepared)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client = MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert killed.info.status == "RUNNING"  # kill -9: nothing could end it
    out = stage(prepared, "train").stdout
    assert "continuing the MLflow run" in out
    (resumed,) = client.search_runs([killed.info.experiment_id])
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "accuracy/val")]
    assert steps == [1, 2, 3, 4, 5]  # every epoch once

    # killed again, then re-run with other params: a fresh start, and the killed run ends KILLED
    proc = train_until_checkpointed(prepared)
    proc.kill()
    proc.wait()
    set_params(prepared, epochs=1)
    stage(prepared, "train")
    statuses = sorted(r.info.status for r in client.search_runs([killed.info.experiment_id]))
    assert statuses == ["FINISHED", "FINISHED", "KILLED"]


@pytest.mark.slow
def test_sigterm_ends_the_run_instead_of_leaving_it_running(prepared: Path):
    set_params(prepared, epochs=30)
    proc = train_until_checkpointed(prepared, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    client = MlflowClient(f"sqlite:///{prepared / 'mlflow.db'}")
    (r,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert r.info.status != "RUNNING"


# ---------------------------------------------------------------- damaged local files


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file(prepared: Path):
    """Simulated by a file-size limit (ulimit -f): the write fails as on a full disk."""
    import resource

    stage(prepared, "check")
    run(["python", "-c", "from pipeline import mlstore; mlstore.connect()"], prepared)  # the store exists
    limit = 1500 * 1024  # above the pictures and the store, below the resume checkpoint
    proc = subprocess.run(["python", "-m", "stages.train"], cwd=prepared, env=clean_env(), capture_output=True,
                          text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = one_line_error(proc, "cannot write checkpoints/last.pt", "too large")
    assert proc.returncode == 2, line
    assert not (prepared / "models/model.pt").exists() and not list((prepared / "checkpoints").glob("*"))


@pytest.mark.slow
def test_damaged_resume_checkpoint_is_set_aside(prepared: Path):
    (prepared / "checkpoints").mkdir()
    (prepared / "checkpoints/last.pt").write_bytes(os.urandom(2000))
    out = stage(prepared, "train").stdout
    assert "checkpoints/last.pt is damaged" in out and "starting fresh" in out
    assert (prepared / "checkpoints/last.pt.damaged").exists() and (prepared / "models/model.pt").exists()


def test_truncated_prepared_array_is_one_line(prepared: Path):
    x = prepared / "data/prepared/train_x.npy"
    x.write_bytes(x.read_bytes()[: x.stat().st_size // 2])
    one_line_error(stage(prepared, "train", check=False), "train_*.npy is damaged", "dvc repro -f prepare")


def test_empty_onnx_and_damaged_checkpoint_given_to_predict(prepared: Path, tmp_path: Path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "bad.pt").write_bytes(os.urandom(100))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for model, words in ((tmp_path / "empty.onnx", "not a readable ONNX model"),
                         (tmp_path / "bad.pt", "not a readable checkpoint")):
        proc = run(["python", "-m", "pipeline", "predict", str(model), str(image)], prepared, check=False)
        one_line_error(proc, words)


def test_symlink_loop_and_dangling_link_in_a_data_folder(tmp_path: Path):
    from PIL import Image

    from pipeline.data.folder import scan_folder
    from pipeline.core.errors import UserError

    for k, cls in enumerate(("a", "b")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + 10 * k, np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data/a/loop").symlink_to(tmp_path / "data/a")   # a folder that contains itself
    (tmp_path / "data/b/gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match="data/a/loop is a link back to .*data/a: a loop; remove it"):
        scan_folder(tmp_path / "data")  # named, not walked without end
    (tmp_path / "data/a/loop").unlink()
    source = scan_folder(tmp_path / "data")
    assert len(source.items) == 6
    assert {s["reason"] for s in source.skipped} == {"dangling symbolic link"}


# ---------------------------------------------------------------- leftovers and modes


def test_a_killed_writes_leftovers_are_removed_and_outputs_follow_the_umask(tmp_path: Path):
    from pipeline.core.io import atomic_path, write_json

    stale = tmp_path / ".model.x1y2z3.tmp.onnx"
    stale.write_bytes(b"half an export")
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"a model")
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert not stale.exists()
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_an_unexpected_error_is_one_line(tmp_path: Path):
    code = "from pipeline.core.errors import run_cli\ndef f():\n    raise RuntimeError('boom\\nsecond line')\nrun_cli(f)"
    proc = run(["python", "-c", code], tmp_path, check=False)
    assert proc.returncode == 1
    assert one_line_error(proc, "RuntimeError: boom", "PIPELINE_TRACEBACK=1")
    proc = run(["python", "-c", code], tmp_path, check=False, PIPELINE_TRACEBACK="1")
    assert "Traceback" in proc.stderr
