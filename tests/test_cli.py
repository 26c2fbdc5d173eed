"""`python -m pipeline summary|models`: real subprocesses, as a user types them. `summary` runs
in a temporary folder: its defaults come from the working directory's params.yaml and data/."""
import json
import typing

from tests.conftest import ROOT, run, set_params


def test_summary_prints_table_counts_and_macs(tmp_path):
    out = run(["python", "-m", "pipeline", "summary", "-m", "resnet18", "--num-classes", "7"], tmp_path).stdout
    assert "fc" in out and "Linear" in out and "512×1×1" in out
    params = 11_176_512 + 7 * 512 + 7  # resnet18 body + a 7-class head
    assert f"parameters: {params:,} total, {params:,} trainable" in out
    assert "M MACs" in out and "input 3×32×32, 7 classes" in out


def test_summary_rejects_alexnet_below_63_px(tmp_path):
    proc = run(["python", "-m", "pipeline", "summary", "-m", "alexnet", "--image-size", "32"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --image-size 32: alexnet needs at least 63 px"


def test_models_lists_ours_and_timm():
    out = run(["python", "-m", "pipeline", "models", "alex*"], ROOT).stdout
    assert out.splitlines()[1].startswith("alexnet") and "1 models matching 'alex*'" in out
    assert "resnet50" in run(["python", "-m", "pipeline", "models", "resnet*"], ROOT).stdout


def test_summary_counts_each_module_with_its_children(tmp_path):
    cmd = ["python", "-m", "pipeline", "summary", "-m", "resnet18", "--num-classes", "7", "--depth", "1"]
    out = run(cmd, tmp_path).stdout
    rows = {line.split()[0]: int(line.split()[-1].replace(",", "")) for line in out.splitlines()
            if line[:1].isalpha() and line.split()[-1].replace(",", "").isdigit()}
    assert rows["layer1"] == 147_968 and rows["layer4"] == 8_393_728  # 2 BasicBlocks each, not 0
    assert sum(rows.values()) == 11_176_512 + 7 * 512 + 7  # the rows at one depth add up to the total


def summary_head(cwd, *args: str) -> tuple[str, str]:
    """`pipeline summary --depth 0 ARGS` in `cwd` → (the line saying where each value came from, the model line)."""
    lines = run(["python", "-m", "pipeline", "summary", "--depth", "0", *args], cwd).stdout.splitlines()
    return lines[0], next(line for line in lines if line.startswith("model "))


def test_summary_defaults_come_from_params_yaml_and_the_prepared_data(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(tmp_path, model="resnet18")
    (tmp_path / "data/resolved").mkdir(parents=True)
    (tmp_path / "data/prepared").mkdir()
    (tmp_path / "data/resolved/preprocessing.json").write_text(json.dumps({"image_size": 48, "stored_size": 48}))
    (tmp_path / "data/prepared/meta.json").write_text(json.dumps({"classes": ["cat", "dog", "fox"]}))
    assert summary_head(tmp_path) == (
        "summary: model resnet18 (params.yaml), 48 px (data/resolved/preprocessing.json), 3 classes (data/prepared)",
        "model resnet18: input 3×48×48, 3 classes")
    assert summary_head(tmp_path, "-m", "original", "--image-size", "20", "--num-classes", "4") == (
        "summary: model original (-m), 20 px (--image-size), 4 classes (--num-classes)",
        "model original: input 3×20×20, 4 classes")  # what is given wins


def test_summary_defaults_without_prepared_data_and_without_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(tmp_path, model="alexnet")
    assert summary_head(tmp_path) == ("summary: model alexnet (params.yaml), 63 px (alexnet's minimum), 10 classes "
                                      "(default)", "model alexnet: input 3×63×63, 10 classes")
    assert summary_head(tmp_path, "-m", "original")[0] == \
        "summary: model original (-m), 32 px (default), 10 classes (default)"
    (tmp_path / "params.yaml").unlink()
    proc = run(["python", "-m", "pipeline", "summary"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: no -m/--model given and no params.yaml here to take the model from; give one (e.g. -m resnet18) "
        "or run in the repository root"]


def models_table(*args: str) -> tuple[dict[str, list[str]], list[str]]:
    """`pipeline models ARGS` → ({name: [params, pretrained, ...]} of its rows, footer lines)."""
    lines = run(["python", "-m", "pipeline", "models", *args], ROOT).stdout.splitlines()
    assert lines[0].split()[0] == "name"
    body = [line for line in lines[1:] if not line.split()[0].rstrip(":").isdigit() and ": " not in line]
    return {line.split()[0]: line.split()[1:] for line in body}, lines[1 + len(body):]


def test_models_shows_parameters_and_pretrained_weights():
    import timm

    rows, footer = models_table("resnet*")
    assert rows["resnet18"][:3] == ["11.7", "M", "yes"] and rows["resnet50"][:3] == ["25.6", "M", "yes"]
    with_weights = {n.split(".")[0] for n in timm.list_models("resnet*", pretrained=True)}
    assert {n for n, r in rows.items() if r[2] == "yes"} == with_weights and len(with_weights) < len(rows)
    assert footer[1] == "params: with a 1000-class head (--num-classes)"
    ours, _ = models_table("[oa]*", "--num-classes", "10")
    assert ours["original"][:3] == ["0.289", "M", "no"]   # our small CNN: no pretrained weights
    assert ours["alexnet"][:3] == ["57.0", "M", "yes"]    # torchvision's ImageNet weights


def test_models_without_a_pattern_lists_every_name_quickly_without_counts():
    import time

    start = time.perf_counter()
    rows, footer = models_table()
    assert time.perf_counter() - start < 60  # a few seconds (imports); counting all would take ~1 min
    assert list(rows)[:2] == ["original", "alexnet"] and len(rows) > 1000
    assert rows["resnet18"][0] == "yes" and rows["original"][0] == "no"
    assert footer[1] == "params: counted when at most 100 models match; give a pattern, e.g. 'resnet*'"


def test_a_closed_pipe_ends_the_listing_quietly():
    import subprocess

    from tests.conftest import clean_env

    proc = subprocess.Popen(["python", "-m", "pipeline", "models"], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("name")
    proc.stdout.close()  # as `| head -1` does
    assert proc.wait(timeout=120) == 1 and proc.stderr.read() == ""


def test_params_prints_and_writes_the_rendered_params_yaml(tmp_path):
    committed = (ROOT / "params.yaml").read_text()
    assert run(["python", "-m", "pipeline", "params"], tmp_path).stdout == committed
    (tmp_path / "params.yaml").write_text("lr: 0.5\n")
    assert run(["python", "-m", "pipeline", "params", "--write"], tmp_path).stdout == "params: wrote params.yaml\n"
    assert (tmp_path / "params.yaml").read_text() == committed


def test_options_that_set_a_param_offer_the_params_choices():
    import argparse

    from pipeline.cli import parser
    from pipeline.core.params import EvaluateParams, TuneParams

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, option, model, field in [("predict", "--tta", EvaluateParams, "tta"),
                                          ("tune", "--sampler", TuneParams, "sampler")]:
        [action] = [a for a in commands[command]._actions if option in a.option_strings]
        assert tuple(action.choices) == typing.get_args(model.model_fields[field].annotation) != ()
