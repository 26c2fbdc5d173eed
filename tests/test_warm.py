"""Warm stages (pipeline/core/warm.py): under `dvc repro` the model stages run in forks of a process
that has torch & co. imported. The same bytes as cold stages; nothing left running when DVC ends,
when the stage is killed, or when the stage process DVC started is killed; off with
PIPELINE_WARM=0. Linux: the processes are found in /proc."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import warm
from tests.conftest import clean_env, gone, left_over, make_project, run, set_params

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets, /proc: Linux")


def warm_start(project: Path) -> bool:
    return json.loads((project / "metrics/train_timing.json").read_text())["warm_start"]


@pytest.mark.slow
def test_a_warm_repro_writes_the_bytes_of_a_cold_one_and_leaves_nothing_running(tmp_path: Path):
    project = make_project(tmp_path / "project")
    run(["dvc", "repro"], project, PIPELINE_WARM="0")
    assert warm_start(project) is False
    cold = (project / "dvc.lock").read_text()
    assert gone(project, within_s=5) == []

    out = run(["dvc", "repro", "-f"], project).stdout
    assert warm_start(project) is True  # train ran in a fork of the server that check started
    assert (project / "dvc.lock").read_text() == cold  # every output, the same bytes
    assert "test accuracy" in out  # report's end block reached DVC's stdout through the fork
    assert gone(project, within_s=5) == []  # the server ended with DVC


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["group", "client"])
def test_a_killed_warm_stage_leaves_nothing_running_and_no_run_running(tmp_path: Path, kill: str):
    """group: SIGTERM to DVC's process group (what a terminal's job control or CI sends); client:
    kill -9 of the stage process DVC started (its fork is ended by the server)."""
    project = make_project(tmp_path / "project")
    set_params(project, epochs=30, image_size=32)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=project, env=clean_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (project / "checkpoints/last.pt").exists():  # train has run an epoch, in a fork
        assert dvc.poll() is None and time.monotonic() < deadline, dvc.stderr.read() if dvc.poll() is not None else ""
        time.sleep(0.1)
    assert any("-m pipeline.core.warm" in cmd for cmd in left_over(project))  # train runs in its fork
    if kill == "group":
        os.killpg(dvc.pid, signal.SIGTERM)
    else:
        client = _stage_processes(project, b"python\0-m\0stages.train\0")
        assert len(client) == 1
        os.kill(client[0], signal.SIGKILL)
    dvc.wait(timeout=60)
    assert dvc.returncode != 0
    assert gone(project, within_s=15) == []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs)  # the fork ended its run on SIGTERM


def _stage_processes(project: Path, cmdline: bytes) -> list[int]:
    """Pids of the processes in `project` (not another test's, run beside this one) with `cmdline`."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("cmdline").read_bytes() == cmdline and \
                    proc.joinpath("cwd").resolve().is_relative_to(project.resolve()):
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def test_the_server_imports_none_of_our_code_and_starts_no_python_thread():
    out = subprocess.run([sys.executable, "-c", "import sys, threading; from pipeline.core import warm; "
                          "print(warm._preload()); "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'stages')))"],
                         capture_output=True, text=True, check=True, env=clean_env()).stdout.splitlines()
    assert out == ["None", "['pipeline', 'pipeline.core', 'pipeline.core.warm']"]  # (a fork drops these and imports the checkout's)


def test_a_stage_starts_cold_outside_dvc_and_when_switched_off(monkeypatch):
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "stages.train"])
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert not warm._eligible()  # `python -m stages.train` by hand
    monkeypatch.setenv("DVC_STAGE", "train")
    assert warm._eligible()
    for off in ({"PIPELINE_WARM": "0"}, {"LOCAL_RANK": "0"}, {"TORCHELASTIC_RUN_ID": "x"}):
        with monkeypatch.context() as m:
            for key, value in off.items():
                m.setenv(key, value)
            assert not warm._eligible()
    assert warm._dvc_owner() is None  # pytest's parent is no DVC
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "stages.download"])
    assert warm._stage_module() == warm.STARTER  # (it starts cold, and starts the server: below)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-X", "importtime", "-m", "stages.train"])
    assert warm._stage_module() is None  # interpreter options the fork could not honour: cold


def test_the_servers_name_follows_the_dvc_process_and_the_environment(monkeypatch):
    a = warm._name("host 100 5.00")
    assert warm._name("host 101 5.00") != a and warm._name("host 100 6.00") != a
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    assert warm._name("host 100 5.00") == a  # the stage it runs is not part of it
    monkeypatch.setenv("TORCH_HOME", "/elsewhere")
    assert warm._name("host 100 5.00") != a


def test_a_refused_param_stops_the_server_with_dvc(tmp_path: Path):
    """check starts the server, then refuses the params: the server, still importing, ends with DVC."""
    project = make_project(tmp_path / "project")
    set_params(project, model="no_such_model")  # download does not read it; check refuses it
    out = run(["dvc", "repro"], project, check=False)
    assert out.returncode != 0 and "no_such_model" in out.stderr, out.stderr
    assert gone(project, within_s=1.5) == []


def test_a_stage_is_forked_once_its_own_imports_are_in_not_all(tmp_path: Path):
    """PRELOAD's groups: a stage named in the first one starts while the server still imports
    the second (here a module that takes 3 s); a stage named nowhere waits for all."""
    import socket

    from pipeline.core.processes import this_process

    (tmp_path / "first_import.py").write_text("import time\ntime.sleep(1)\n")
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(3)\n")
    for stage in ("early_stage", "late_stage"):
        (tmp_path / f"{stage}.py").write_text("import sys, time\nprint(time.time(), 'slow_import' in sys.modules)\n")
    name = f"pipeline-warm-test-{os.getpid()}"
    server = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline.core import warm; "
                               "warm.PRELOAD = ((('early_stage',), ('first_import',)), (None, ('slow_import',))); "
                               "warm.serve(sys.argv[1], sys.argv[2])", name, this_process()],
                              env=clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{Path.cwd()}"))
    try:
        started, conns = time.time(), {}
        for stage in ("early_stage", "late_stage"):  # both ask while the server imports first_import
            conns[stage] = warm._connect("\0" + name, within_s=5.0)
            with open(os.devnull) as stdin, open(tmp_path / f"{stage}.out", "w") as stdout:
                request = {"module": stage, "argv": [], "cwd": str(tmp_path), "env": clean_env()}
                socket.send_fds(conns[stage], [json.dumps(request).encode()], [stdin.fileno(), stdout.fileno(), 2])
        ran = {}
        for stage, conn in conns.items():
            assert "pid" in warm._receive(conn) and warm._receive(conn)["status"] == 0
            at, loaded = (tmp_path / f"{stage}.out").read_text().split()
            ran[stage] = (float(at) - started, loaded)
        assert ran["early_stage"][0] < 3 and ran["early_stage"][1] == "False", ran  # while slow_import ran
        assert ran["late_stage"][0] >= 4 and ran["late_stage"][1] == "True", ran
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("stage", ["evaluate", "check"])
def test_ctrl_c_while_a_stage_imports_is_one_line(tmp_path: Path, stage: str):
    """Ctrl-C before run_cli is reached (torch & co. still importing): "interrupted" and exit 130,
    no traceback from inside a library."""
    project = make_project(tmp_path / "project")
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=clean_env(PIPELINE_WARM="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n", err


def test_download_runs_cold_and_starts_the_server_for_the_stages_after_it():
    import psutil

    from pipeline.core.processes import this_process

    name = f"\0pipeline-warm-test-starter-{os.getpid()}"
    assert warm._handed_over(warm.STARTER, name, this_process()) == (None, 0)  # cold, at once
    conn = warm._connect(name, within_s=5.0)
    assert conn is not None  # a server is there for check
    conn.close()
    server = [p for p in psutil.Process().children() if "pipeline.core.warm" in " ".join(p.cmdline())]
    assert len(server) == 1
    assert warm._handed_over(warm.STARTER, name, this_process()) == (None, 0)  # a second: no second server
    assert len([p for p in psutil.Process().children() if "pipeline.core.warm" in " ".join(p.cmdline())]) == 1
    server[0].kill()
    server[0].wait(10)
