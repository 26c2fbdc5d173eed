"""params.yaml validation: every mistake is one line naming the key, the value and what is allowed."""
from pathlib import Path

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.params import load_params, parse_params
from tests.conftest import ROOT, run

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(key: str, value) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return raw


def error_of(raw) -> str:
    with pytest.raises(UserError) as exc:
        parse_params(raw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_repo_params_are_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    assert params.dataset == "digits" and params.lr == "auto"
    # every key in the file is a field, and every field is in the file (it documents them all)
    assert params.model_dump().keys() == DEFAULTS.keys()
    for section, values in DEFAULTS.items():
        if isinstance(values, dict):
            assert values.keys() == params.model_dump()[section].keys(), section


@pytest.mark.parametrize("key, value, expected", [
    ("lr", -1, ["lr=-1", "greater than 0"]),
    ("lr", "fast", ["lr='fast'", "number"]),
    ("epochs", 0, ["epochs=0", "greater than or equal to 1"]),
    ("epochs", 2.5, ["epochs=2.5", "integer"]),
    ("batch_size", "64", ["batch_size='64'", "integer"]),
    ("image_size", 4, ["image_size=4", "auto or a whole number of pixels from 8 to 1024"]),
    ("image_size", "big", ["image_size='big'", "auto or"]),
    ("data.test_fraction", 0.9, ["data.test_fraction=0.9", "less than 0.5"]),
    ("augment.hflip", "yes", ["augment.hflip='yes'", "boolean"]),
    ("train.optimizer", "adamm", ["train.optimizer='adamm'", "'sgd'", "'adamw'"]),
    ("dataset", "imagenet", ["dataset='imagenet'", "allowed: digits"]),
])
def test_bad_value_names_key_value_and_allowed(key, value, expected):
    msg = error_of(with_change(key, value))
    for part in expected:
        assert part in msg, msg


def test_int_is_accepted_where_a_float_is_expected():
    assert parse_params(with_change("lr", 1)).lr == 1.0


def test_unknown_keys_list_the_allowed_ones():
    raw = dict(DEFAULTS, learning_rate=0.1)
    msg = error_of(raw)
    assert "unknown key 'learning_rate'" in msg and "lr" in msg and "epochs" in msg
    raw = with_change("train.nesterov_momentum", True)
    msg = error_of(raw)
    assert "unknown key 'train.nesterov_momentum'" in msg and "optimizer" in msg and "momentum" in msg


def test_unknown_model_suggests_close_names():
    msg = error_of(with_change("model", "resnet81"))
    assert "model='resnet81'" in msg and "resnet18" in msg and "original" in msg
    assert parse_params(with_change("model", "resnet18")).model == "resnet18"


def test_not_a_mapping_and_bad_yaml(tmp_path: Path):
    assert "expected a mapping" in error_of([1, 2])
    bad = tmp_path / "params.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize("stage", ["download", "train"])
def test_stage_stops_with_one_line_and_touches_nothing(project: Path, stage: str):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["lr"] = -1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    sentinel = project / "models" / "model.pt"
    sentinel.parent.mkdir()
    sentinel.write_bytes(b"an earlier checkpoint")
    proc = run(["python", "-m", f"stages.{stage}"], project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: params.yaml: lr=-1: Input should be greater than 0"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sentinel.read_bytes() == b"an earlier checkpoint"
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()


def test_numbers_are_read_as_dvc_writes_them_and_must_be_finite(tmp_path):
    """`-S lr=1e-5` makes DVC write `lr: 1e-05`, a float in YAML 1.2 (a string in PyYAML's 1.1)."""
    (tmp_path / "params.yaml").write_text("lr: 1e-05\ntrain:\n  weight_decay: 5E-4\n")
    params = load_params(tmp_path / "params.yaml", check_models=False)
    assert params.lr == 1e-05 and params.train.weight_decay == 5e-4
    (tmp_path / "params.yaml").write_text("train:\n  warmup_epochs: .inf\n")
    with pytest.raises(UserError, match="train.warmup_epochs=inf: Input should be a finite number"):
        load_params(tmp_path / "params.yaml", check_models=False)
