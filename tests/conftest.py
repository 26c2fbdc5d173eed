"""Shared fixtures: a copy of the project in a temporary git repo, tiny params, prepared digits."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# Small enough for seconds per stage, big enough to learn: 2 epochs of digits at 16 px.
TINY = {"epochs": 2, "image_size": 16, "batch_size": 64}
# The pictures of a model's inside take ~7 s of each evaluate run; the DVC CLI tests (a dozen or
# more pipeline runs) check stages, caching and tracking, not pictures: they get the one-line note
# pictures instead. The pictures themselves: tests/test_inside.py and the in-process pipeline.
NO_INSIDE_PICTURES = {"evaluate.activations": False, "evaluate.filters": False, "evaluate.embedding": False}


def plain(x, mean: float = 0.5, std: float = 0.3):
    """The preprocessing of images stored at their model input size with a fixed mean/std."""
    from pipeline.preprocess import Preprocessing

    return Preprocessing(x.shape[-1], x.shape[-1], mean=(mean,) * 3, std=(std,) * 3)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: our venv first on PATH, no tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def train_until_checkpointed(project: Path, **popen) -> subprocess.Popen:
    """Start the train stage and return once it has written checkpoints/last.pt (after its
    first epoch), still running: for tests that interrupt it."""
    import time

    proc = subprocess.Popen(["python", "-m", "stages.train"], cwd=project, env=clean_env(),
                            **({"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} | popen))
    last, deadline = project / "checkpoints/last.pt", time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc


def set_params(project: Path, **updates) -> None:
    from pipeline.params import update_params_file

    update_params_file(project / "params.yaml", updates)


def make_project(dest: Path) -> Path:
    """The project's files (tracked, and new ones git does not ignore), copied into a fresh git
    repo at `dest` with tiny params committed."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    set_params(dest, **TINY, **NO_INSIDE_PICTURES)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init"]):
        run(cmd, dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project in a fresh git repo with tiny params committed (`make_project`)."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """digits downloaded and prepared at 16 px into a temporary folder; returns data/prepared."""
    from pipeline.data.prepare import prepare
    from pipeline.data.registry import download, load_source

    base = tmp_path_factory.mktemp("digits")
    download("digits", base / "raw")
    prepare(load_source("digits", base / "raw"), 16, 0.15, 0.15, 0, base / "prepared")
    return base / "prepared"


REGISTERED_MODEL = "tiny-digits"  # mlflow.register_model in `exported_pipeline`


@pytest.fixture(scope="session")
def exported_pipeline(tmp_path_factory) -> tuple[Path, str, dict]:
    """download → prepare → train → evaluate → export → report, once, in-process on tiny digits
    in a temporary folder, with a real SQLite MLflow store and the model registered as
    REGISTERED_MODEL with alias `champion`. Returns (work dir, tracking URI, each stage's result)."""
    from stages import check, download, evaluate, export, prepare, report, train

    work = tmp_path_factory.mktemp("exported")
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(work, **TINY, **{"mlflow.register_model": REGISTERED_MODEL, "mlflow.model_alias": "champion"})
    uri = f"sqlite:///{work / 'store.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        check.main()
        download.main()
        results = {"prepare": prepare.main(), "train": train.main(), "evaluate": evaluate.main(),
                   "export": export.main(), "report": report.main()}
    return work, uri, results


# ---------------------------------------------------------------- scheduling on several workers
# `make test` runs the suite on every core (pytest-xdist, `--dist loadfile`: a test file's tests
# on one worker, so a module's expensive fixture, such as the DVC experiments of test_runs.py, is
# built once). The files with slow end-to-end tests start first: the longest jobs first leave no
# worker idle at the end.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first, else as written
