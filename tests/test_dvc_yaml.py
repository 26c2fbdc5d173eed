"""dvc.yaml knows everything each stage uses, checked against the code, not by eye: every
source file the stage executes (its imports, followed transitively) is covered by one of its
deps, and its `params:` are the only keys the stage can read: each stage script loads its
params as `load_params(stage="<its name>")`, a view of exactly those keys that refuses any
other (so the stages run in-process by tests/test_stages.py read nothing undeclared)."""
import ast
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


def load_params_calls(stage: str) -> list[ast.Call]:
    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text())
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_params"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_its_params_through_the_view_of_its_own_dvc_yaml_entry(stage):
    """A stage with params loads them as `load_params(stage="<its name>")` and nothing else; a
    stage without params does not load them at all."""
    calls = load_params_calls(stage)
    if not DVC[stage].get("params"):
        assert not calls, f"stages/{stage}.py loads params, but dvc.yaml lists none for it"
        return
    assert calls, f"stages/{stage}.py does not load its params with load_params(stage={stage!r})"
    for call in calls:
        kwargs = {k.arg: k.value for k in call.keywords}
        assert not call.args and isinstance(kwargs.get("stage"), ast.Constant) and kwargs["stage"].value == stage, \
            f"stages/{stage}.py: {ast.unparse(call)} must read the view of its own params: load_params(stage={stage!r})"


@pytest.mark.parametrize("stage", [s for s in STAGES if DVC[s].get("params")])
def test_the_view_holds_exactly_the_declared_keys(stage):
    from pipeline.core.params import Params, load_params, stage_keys

    view = load_params(ROOT / "params.yaml", stage=stage)
    declared = set(DVC[stage]["params"])
    assert set(stage_keys(stage)) == declared
    for key in Params.model_fields:
        if key in declared or any(k.startswith(key + ".") for k in declared):
            getattr(view, key)
        else:
            with pytest.raises(AttributeError, match=f"'{key}' without declaring it: add it to the stage's params in "
                                                     "dvc.yaml"):
                getattr(view, key)


def test_the_check_stage_reads_every_section():
    """check validates all of params.yaml, so every top-level key is among its params."""
    from pipeline.core.params import Params, stage_keys

    assert {k.split(".")[0] for k in stage_keys("check")} == set(Params.model_fields)


def test_a_stage_cannot_read_a_param_it_did_not_declare():
    from pipeline.core.params import load_params

    params = load_params(ROOT / "params.yaml", stage="train")  # declares data.split_seed and mlflow.experiment
    assert params.data.split_seed == 0 and params.mlflow.experiment == "auto"
    with pytest.raises(AttributeError, match="'dataset' without declaring it"):
        params.dataset
    with pytest.raises(AttributeError, match="'data.val_fraction' without declaring it"):
        params.data.val_fraction
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


def test_download_is_declared_first_so_dvc_runs_it_before_check_on_any_data_set():
    """check depends on download's data/raw for the downloaded sets; for a folder of the user's
    nothing orders the two, and DVC takes them in the order of dvc.yaml. download first: its
    cold start (light imports) overlaps the warm server's import of torch, which check waits for
    (docs/layout.md); tests/test_dvc_e2e.py asks DVC for the order in a folder project."""
    assert STAGES[:2] == ["download", "check"]


def test_dvc_reads_yaml_with_ruamel_yamls_c_parser():
    """DVC parses dvc.yaml, dvc.lock and params.yaml (each several times a stage) with
    ruamel.yaml's safe loader; its C parser (ruamel.yaml.clib, optional since ruamel.yaml 0.19.1,
    a dependency of ours) reads this dvc.lock 4x faster than the pure-Python one."""
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "pip install ruamel.yaml.clib (pyproject.toml lists it)"
    text = (ROOT / "dvc.lock").read_text() if (ROOT / "dvc.lock").exists() else (ROOT / "dvc.yaml").read_text()
    yaml_ = YAML(typ="safe")
    assert yaml_.Parser is CParser and yaml_.load(text)


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
    from pipeline.core import paths
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


def test_python_bytecode_is_no_part_of_any_code_dependency():
    """Python writes __pycache__/*.pyc beside the code a stage imports (unless PYTHONDONTWRITEBYTECODE
    is set, as it is not in a user's shell). Hashed into the code folders a stage depends on, they
    would make `dvc status` list changed deps right after `dvc repro` (tests/test_dvc_e2e.py runs
    with bytecode written): the real dvc says .dvcignore leaves them out."""
    import subprocess

    from tests.conftest import clean_env

    pyc = ["pipeline/core/__pycache__/params.cpython-311.pyc", "stages/__pycache__/train.cpython-311.pyc"]
    out = subprocess.run(["dvc", "check-ignore", *pyc, "pipeline/core/params.py"], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True)
    assert out.stdout.split() == pyc, out.stdout + out.stderr
