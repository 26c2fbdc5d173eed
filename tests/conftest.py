"""Shared fixtures: a copy of the project in a temporary git repo, tiny params, prepared digits."""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite runs on every core at once (pytest-xdist): one thread per process, the tests' and the
# stages' they start (clean_env passes it on). Two torch threads per process on two busy cores wait
# on each other: a training step took 2× as long as with one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The bf16 probe's remembered answers (pipeline.training.precision) of the tests' tiny models stay
# out of the user's cache: one folder per test process, removed at its exit.
os.environ.setdefault("PIPELINE_CACHE_DIR", tempfile.mkdtemp(prefix="pipeline-test-cache-"))
atexit.register(shutil.rmtree, os.environ["PIPELINE_CACHE_DIR"], True)

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
    from pipeline.core.preprocess import Preprocessing

    return Preprocessing(x.shape[-1], x.shape[-1], mean=(mean,) * 3, std=(std,) * 3)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: our venv first on PATH, no tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # Python writes __pycache__ beside the code, as it does for a user
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
    from pipeline.core.params import update_params_file

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


def _files(project: Path) -> dict[str, tuple[int, int]]:
    """Every file of `project` outside .git: relative path -> (size, mtime in ns)."""
    return {str(f.relative_to(project)): (f.lstat().st_size, f.lstat().st_mtime_ns)
            for f in project.rglob("*") if ".git" not in f.relative_to(project).parts and not f.is_dir()}


@pytest.fixture(scope="session")
def first_stages(tmp_path_factory):
    """`first_stages(project)`: the check, download and prepare stages, run in `project` as
    `python -m stages.NAME`. A later project with the same params.yaml gets copies of the files
    they wrote instead (the same bytes: the stages are deterministic and read nothing else of
    the project): a dozen tests start from prepared digits, each run of the three costs ~6 s."""
    done: dict[str, tuple[Path, list[str]]] = {}

    def first_stages(project: Path) -> Path:
        key = hashlib.sha256((project / "params.yaml").read_bytes()).hexdigest()
        if key not in done:
            before = _files(project)
            for name in ("check", "download", "prepare"):
                run(["python", "-m", f"stages.{name}"], project)
            written = sorted(rel for rel, stamp in _files(project).items() if before.get(rel) != stamp)
            store = tmp_path_factory.mktemp("first-stages")
            for rel in written:
                (store / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(project / rel, store / rel, follow_symlinks=False)
            done[key] = (store, written)
            return project
        store, written = done[key]
        for rel in written:
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(store / rel, project / rel, follow_symlinks=False)
        return project

    return first_stages


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """digits downloaded and prepared at 16 px into a temporary folder; returns data/prepared."""
    from pipeline.data.prepare import prepare
    from pipeline.core.params import DataParams
    from pipeline.data.registry import download, load_source

    base = tmp_path_factory.mktemp("digits")
    download("digits", base / "raw")
    prepare(load_source("digits", base / "raw"), 16, DataParams(val_fraction=0.15, test_fraction=0.15, split_seed=0), base / "prepared")
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
# built once). Files go to the workers in the order of their tests here (`--no-loadscope-reorder`;
# xdist would otherwise start with the files of most tests): the files with most slow end-to-end
# tests first, so the longest jobs start first and no worker waits alone at the end (xdist's own
# order put test_dvc_e2e.py's 7 minutes last).


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow: dict[str, int] = {}
    for item in items:
        slow[item.path.name] = slow.get(item.path.name, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path.name])  # stable: within a file, as written


def left_over(project: Path) -> list[str]:
    """Live processes working inside `project` (Linux: read from /proc): their command lines."""
    out, project = [], project.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and \
                    proc.joinpath("cwd").resolve().is_relative_to(project):
                out.append(proc.joinpath("cmdline").read_text().replace("\0", " "))
        except OSError:
            continue
    return out


def gone(project: Path, within_s: float = 15) -> list[str]:
    """`left_over(project)` once it is empty or `within_s` have passed."""
    import time

    deadline = time.time() + within_s
    while (left := left_over(project)) and time.time() < deadline:
        time.sleep(0.1)
    return left
