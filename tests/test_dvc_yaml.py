"""dvc.yaml knows everything each stage uses, checked against the code, not by eye: every
source file the stage executes (its imports, followed transitively) is covered by one of its
deps, and its params are exactly the keys the stage declares and is allowed to read."""
import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.codedeps import ROOT, stage_files

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
STAGES = [name for name, spec in DVC.items() if spec["cmd"].split()[:3] == ["python", "-m", f"stages.{name}"]]


def test_every_stage_runs_its_own_script():
    assert STAGES == list(DVC), "each stage's cmd is `python -m stages.<its name>` (and, in a matrix, its item)"


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_every_file_the_stage_executes(stage):
    deps = [d for d in DVC[stage].get("deps", []) if isinstance(d, str)]
    missing = [str(p.relative_to(ROOT)) for p in stage_files(stage) if not covered(p, deps)]
    assert not missing, f"dvc.yaml: stage {stage} executes these files but does not depend on them: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_params_are_the_keys_the_stage_reads(stage):
    declared = importlib.import_module(f"stages.{stage}").PARAMS
    listed = DVC[stage].get("params", [])
    assert sorted(listed) == sorted(declared), f"dvc.yaml params of {stage} differ from stages/{stage}.py PARAMS"


def test_the_check_stage_reads_every_section():
    """check validates all of params.yaml, so every top-level key is among its params."""
    from stages.check import PARAMS

    assert {k.split(".")[0] for k in PARAMS} == set(yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_a_stage_cannot_read_a_param_it_did_not_declare():
    from pipeline.params import load_params

    params = load_params(ROOT / "params.yaml", keys=("dataset", "mlflow.experiment"))
    assert params.dataset == "digits" and params.mlflow.experiment == "auto"
    with pytest.raises(AttributeError, match="'lr' without declaring it"):
        params.lr
    with pytest.raises(AttributeError, match="'mlflow.register_model' without declaring it"):
        params.mlflow.register_model


def outs(stage: str) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "plots")
            for o in DVC[stage].get(key, [])}


def test_no_stage_runs_on_every_repro():
    """`dvc status` is clean when nothing changed (an always-changed stage never is); the check
    stage depends on the whole params.yaml instead, so that a key no stage lists (a typo, `-S
    +epoch=30`) is refused too (tests/test_faults.py runs it under DVC)."""
    assert not [name for name, spec in DVC.items() if spec.get("always_changed")]
    assert "params.yaml" in DVC["check"]["deps"]


def test_the_report_stage_depends_on_everything_it_publishes():
    """What train, evaluate and export write is what the report and the MLflow run hold: a
    change to any of it re-runs the report (derived from the stages' outputs, not listed twice
    by eye). Its own record is cached and persist: a fresh clone has none (so its first run
    publishes), and DVC's run cache never restores it (which would skip this run's MLflow run)."""
    deps = set(DVC["report"]["deps"])
    missing = sorted((outs("train") | outs("evaluate") | outs("export")) - deps)
    assert not missing, f"dvc.yaml: stage report does not depend on {missing}"
    [record] = DVC["report"]["outs"]
    assert record == {"models/report.json": {"persist": True}}  # cached (not in git), persist
    assert STAGES[-1] == "report"


def test_train_depends_on_the_weights_through_the_check_stages_link(tmp_path):
    from pipeline import paths
    from pipeline.check import link_weights

    assert str(paths.RESOLVED_WEIGHTS) in outs("check") and str(paths.RESOLVED_WEIGHTS) in DVC["train"]["deps"]
    link = tmp_path / "resolved" / "weights"
    link_weights(None, link)
    assert not link.is_symlink() and "weights: null" in link.read_text()  # not empty: DVC warns of empty deps
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"first")
    link_weights(str(weights), link)
    assert link.is_symlink() and link.read_bytes() == b"first"
    weights.write_bytes(b"second")  # DVC hashes what the link points to: new bytes, a changed dep
    assert link.read_bytes() == b"second"


def test_the_lock_file_holds_only_stages_of_the_pipeline():
    """DVC keeps the lock entries of stages removed from dvc.yaml and parses them on every
    command (ten old fold stages made a no-op `dvc repro` take 2 s instead of 1.5)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(DVC)
