"""The pipeline against a real `mlflow server` on 127.0.0.1 (temporary SQLite backend and
artifact root): `dvc repro` with MLFLOW_TRACKING_URI pointing at it, then the run, its
metrics, artifacts and model read back through the server's REST API."""
import json
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import VENV_BIN, clean_env, run

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLANTED = "pw-" + uuid.uuid4().hex  # made here: not in any file of the project (its tests are copied too)


@pytest.fixture
def mlflow_server(tmp_path: Path, monkeypatch):
    """A real tracking server with its own SQLite store and proxied artifact root, behind MLflow's
    basic authentication: user admin, password PLANTED (this process reads it with them)."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [f"{VENV_BIN}/mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env=clean_env(MLFLOW_AUTH_ADMIN_PASSWORD=PLANTED, MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
                      # no job runner: four more Python processes (MLflow's GenAI jobs) the test does not use
                      MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log, stderr=subprocess.STDOUT)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PLANTED)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, tmp_path / "artifacts"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def holders_of(secret: str, *folders: Path) -> list[str]:
    """Every file under `folders` (git's objects, DVC's cache and lock, the stores, the
    checkpoints) whose bytes hold `secret`."""
    return [str(f) for folder in folders for f in folder.rglob("*")
            if f.is_file() and not f.is_symlink() and secret.encode() in f.read_bytes()]


def test_pipeline_logs_to_a_tracking_server(project: Path, mlflow_server):
    """...which wants a user and password, given in the tracking URI: they work, and reach no
    file of the project or the server and no line printed. Without them: one line, HTTP 401."""
    url, artifact_root = mlflow_server
    refused = run(["python", "-m", "stages.check"], project, check=False, MLFLOW_TRACKING_URI=url)
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
    proc = run(["dvc", "repro"], project, MLFLOW_TRACKING_URI=url.replace("//", f"//admin:{PLANTED}@"))
    assert not (project / "mlflow.db").exists()  # nothing went to the default local store
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "after the run"], project)
    assert PLANTED not in proc.stdout + proc.stderr
    assert holders_of(PLANTED, project, artifact_root.parent) == []

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_id == json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    assert r.info.status == "FINISHED"
    assert r.data.params["lr"] == "0.003" and r.data.params["model"] == "original"
    assert {"dataset": "digits", "model": "original", "finetune": "full"}.items() <= r.data.tags.items()
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert r.data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"], abs=5e-5)
    assert [m.step for m in client.get_metric_history(r.info.run_id, "accuracy/val")] == [1, 2]

    # artifacts went through the server into its artifact root, and come back byte for byte
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"confusion_matrix.png", "learning_curves.png", "eval.json", "onnx"} <= names
    downloaded = Path(client.download_artifacts(r.info.run_id, "eval.json", str(project / "dl")))
    assert json.loads(downloaded.read_text()) == evaluation
    assert list(artifact_root.rglob("confusion_matrix.png"))

    # the logged model: found through the server and usable
    import mlflow

    mlflow.set_tracking_uri(url)
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [r.info.run_id]
    import numpy as np

    pyfunc = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    size = json.loads((project / "models/model.json").read_text())["image_size"]
    out = pyfunc.predict(np.zeros((2, 3, size, size), dtype=np.float32))
    logits = next(iter(out.values())) if isinstance(out, dict) else np.asarray(out)
    assert np.asarray(logits).shape == (2, 10)
