"""params.yaml validation: every mistake is one line naming the key, the value and what is allowed;
and params.yaml is what the params model renders."""
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pipeline.core.errors import UserError
from pipeline.core.params import Params, load_params, parse_params, read_yaml
from pipeline.data.registry import DATASETS
from pipeline.params_doc import render_params_yaml
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


def test_params_yaml_is_rendered_from_the_model():
    """Defaults and comments are written once, in pipeline/core/params.py; params.yaml is their rendering."""
    committed = (ROOT / "params.yaml").read_text()
    assert committed == render_params_yaml(), ("params.yaml is not what pipeline/core/params.py renders: change defaults "
                                               "and comments in pipeline/core/params.py, then run "
                                               "`python -m pipeline params --write`")
    assert parse_params(read_yaml(committed)) == Params()


def test_every_key_and_every_choice_is_documented():
    """Each key has a comment, and a Literal's every choice is named in it (a new choice cannot go undocumented)."""
    sections = [Params] + [f.annotation for f in Params.model_fields.values() if isinstance(f.default, BaseModel)]
    for model in sections:
        for name, field in model.model_fields.items():
            if isinstance(field.default, BaseModel):
                assert type(field.default).__doc__, f"section {name} has no docstring (its comment in params.yaml)"
                continue
            assert field.description, f"{model.__name__}.{name} has no description (its comment in params.yaml)"
            literals = [a for a in (field.annotation, *typing.get_args(field.annotation))
                        if typing.get_origin(a) is typing.Literal]
            missing = [c for lit in literals for c in typing.get_args(lit) if c not in field.description]
            assert not missing, f"{model.__name__}.{name}: the description does not say what {missing} do"
    assert all(name in Params.model_fields["dataset"].description for name in DATASETS)


def test_values_are_written_as_yaml_reads_them():
    from pipeline.params_doc import _value

    cases = [(1e-05, "0.00001"), (1.3333, "1.3333"), (0, "0"), (1.0, "1.0"), (None, "null"), (True, "true"),
             ("data/raw", "data/raw"), ("null", '"null"'), ("a: b", '"a: b"'), ("x, y", '"x, y"'), ("#x", '"#x"')]
    for value, text in cases:
        assert _value(value) == text
        read = read_yaml(f"k: [{text}]")["k"][0]
        assert read == value and type(read) is type(value)


@pytest.mark.parametrize("key, value, expected", [
    ("lr", -1, ["lr=-1", "greater than 0"]),
    ("lr", "fast", ["lr='fast'", "number"]),
    ("epochs", 0, ["epochs=0", "greater than or equal to 1"]),
    ("epochs", 2.5, ["epochs=2.5", "integer"]),
    ("batch_size", "64", ["batch_size='64'", "integer"]),
    ("lr", 11, ["lr=11", "less than or equal to 10"]),
    ("lr", True, ["lr=True", "use auto or a number"]),
    ("image_size", 4, ["image_size=4", "greater than or equal to 8"]),
    ("image_size", "big", ["image_size='big'", "use auto or a whole number of pixels"]),
    ("transfer.probe_l2", -1, ["transfer.probe_l2=-1", "greater than or equal to 0"]),
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
