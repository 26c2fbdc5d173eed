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
    assert params.dataset == "digits" and params.mlflow.experiment == "image-classification"
    with pytest.raises(AttributeError, match="'lr' without declaring it"):
        params.lr
    with pytest.raises(AttributeError, match="'mlflow.register_model' without declaring it"):
        params.mlflow.register_model
