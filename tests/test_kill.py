"""Killing a DDP training run (`train.nproc: 2`, real torchrun with gloo on the CPU) stops all of it:
kill -9 or SIGTERM of the train stage, kill -9 of torchrun's agent or of one worker leaves no
process running and nothing written afterwards; the resume checkpoint stays and the next run
resumes from it. Linux: the processes are found in /proc."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.training.distributed import _failed
from tests.conftest import clean_env, make_project, run, set_params

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="processes tied to their parent: Linux")

EPOCHS = 8  # ~1.5 s each on 2 cores: a survivor would go on for 10 s, rewriting the resume checkpoint


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, first_stages) -> Path:
    """A project with prepared digits and `train.nproc: 2`."""
    project = make_project(tmp_path_factory.mktemp("kill") / "project")
    set_params(project, **{"train.nproc": 2, "epochs": EPOCHS})
    return first_stages(project)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the name (state, ppid, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has stopped: only its exit code is left


def children(pid: int) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return sorted(c for c in pids if (fields := _stat(c)) and int(fields[1]) == pid and fields[0] != "Z")


def tree(stage: int) -> dict:
    """The train stage's processes: the stage, torchrun's agent and its workers (none yet: [])."""
    agents = children(stage)
    return {"stage": stage, "agent": agents[0] if agents else None,
            "workers": children(agents[0]) if agents else []}


def pids(t: dict) -> set[int]:
    return {p for p in (t["stage"], t["agent"], *t["workers"]) if p}


def kill_leftovers(found: set[int]) -> None:
    """SIGKILL to what is still running of the processes seen (only ours: the pid may be reused)."""
    for pid in found:
        try:
            if alive(pid) and b"stages.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@contextmanager
def training(project: Path, log: Path) -> Iterator[tuple[subprocess.Popen, dict]]:
    """The train stage started from scratch, once both workers train and the resume checkpoint
    holds an epoch; whatever is left of its processes is killed on the way out."""
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    for out in ("models/model.pt", "metrics/train.json"):
        (project / out).unlink(missing_ok=True)
    with open(log, "w") as sink:
        proc = subprocess.Popen(["python", "-m", "stages.train"], cwd=project, env=clean_env(), stdout=sink, stderr=sink)
    seen, t = {proc.pid}, tree(proc.pid)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            t = tree(proc.pid)
            seen |= pids(t)
            if len(t["workers"]) == 2 and (project / "checkpoints/last.pt").exists():
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(t["workers"]) == 2, log.read_text()[-3000:]
        yield proc, t
    finally:
        kill_leftovers(seen | pids(tree(proc.pid)))
        proc.kill()
        proc.wait()


def assert_all_gone(t: dict, within: float = 3) -> None:
    deadline = time.time() + within
    while time.time() < deadline and any(alive(p) for p in pids(t)):
        time.sleep(0.1)
    assert not [p for p in pids(t) if alive(p)], t


def written(project: Path) -> dict[str, int]:
    files = [p for d in ("checkpoints", "models", "metrics") for p in (project / d).rglob("*") if p.is_file()]
    return {str(p): p.stat().st_mtime_ns for p in files + list(project.glob("mlflow.db*"))}


def assert_nothing_written_after(project: Path, seconds: float = 4) -> None:
    before = written(project)
    time.sleep(seconds)
    assert written(project) == before
    assert (project / "checkpoints/last.pt").exists()
    assert not (project / "models/model.pt").exists() and not (project / "metrics/train.json").exists()


KILLS = [  # (whom, signal, the stage's exit code, its last line)
    ("stage", signal.SIGTERM, 130, "interrupted"),
    ("agent", signal.SIGKILL, 137, "error: torchrun was stopped by SIGKILL"),
    ("worker", signal.SIGKILL, 137, "error: DDP worker rank"),
]


@pytest.mark.slow
@pytest.mark.parametrize("whom, sig, code, last_line", KILLS, ids=[f"{k[0]}-{k[1].name}" for k in KILLS])
def test_a_killed_ddp_run_leaves_nothing_running(ddp: Path, tmp_path: Path, whom, sig, code, last_line):
    log = tmp_path / "train.log"
    with training(ddp, log) as (proc, t):
        os.kill(t["workers"][0] if whom == "worker" else t[whom], sig)
        assert proc.wait(timeout=90) == code, log.read_text()[-3000:]
        assert_all_gone(t)
        assert_nothing_written_after(ddp)
    out = log.read_text()
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith(last_line), out[-3000:]


@pytest.mark.slow
def test_kill_9_of_the_stage_stops_all_and_the_next_run_resumes(ddp: Path, tmp_path: Path):
    with training(ddp, tmp_path / "train.log") as (proc, t):
        os.kill(t["stage"], signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert_all_gone(t)
        assert_nothing_written_after(ddp)
    epoch = torch.load(ddp / "checkpoints/last.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < EPOCHS
    out = run(["python", "-m", "stages.train"], ddp).stdout
    assert f"resuming from checkpoints/last.pt after epoch {epoch}" in out
    assert "continuing the MLflow run" in out  # nothing ended it after the kill
    assert (ddp / "models/model.pt").exists() and not (ddp / "checkpoints/last.pt").exists()


def test_the_killed_worker_is_named_not_the_one_its_death_broke(capsys):
    same_second = 1_700_000_000  # torch records failures to the second
    broken, killed = SimpleNamespace(exitcode=1, timestamp=same_second), SimpleNamespace(exitcode=-9, timestamp=same_second)
    assert _failed({0: broken, 1: killed}) == 137
    assert capsys.readouterr().err.startswith("error: DDP worker rank 1 was killed by SIGKILL;")
    assert _failed({0: SimpleNamespace(exitcode=2, timestamp=same_second)}) == 2  # the worker has said why
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_decode_worker(tmp_path: Path):
    """prepare decodes a large folder in forked workers (multiprocessing's Pool); after kill -9
    of the stage they find their task pipe closed and exit: none is left."""
    from PIL import Image

    from pipeline.data.prepare import _PARALLEL_FROM

    project = make_project(tmp_path / "project")
    for k, name in enumerate(("a", "b")):
        (project / "images" / name).mkdir(parents=True)
        for i in range(_PARALLEL_FROM // 2 + 100):
            Image.new("RGB", (64, 64), (40 * k, i % 256, i // 256)).save(project / "images" / name / f"{i}.png")
    set_params(project, dataset="folder", data_dir="images", image_size=64)
    run(["python", "-m", "stages.check"], project)
    proc = subprocess.Popen(["python", "-m", "stages.prepare"], cwd=project, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            workers = children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "no decode workers started"
        proc.kill()
        proc.wait()
        assert_all_gone({"stage": proc.pid, "agent": None, "workers": workers})
    finally:
        for pid in workers:
            if alive(pid) and b"stages.prepare" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
