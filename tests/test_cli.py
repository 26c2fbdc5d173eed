"""`python -m pipeline summary|models`: real subprocesses, as a user types them."""
from tests.conftest import ROOT, run


def test_summary_prints_table_counts_and_macs():
    out = run(["python", "-m", "pipeline", "summary", "-m", "resnet18", "--num-classes", "7"], ROOT).stdout
    assert "fc" in out and "Linear" in out and "512×1×1" in out
    params = 11_176_512 + 7 * 512 + 7  # resnet18 body + a 7-class head
    assert f"parameters: {params:,} total, {params:,} trainable" in out
    assert "M MACs" in out and "input 3×32×32, 7 classes" in out


def test_summary_rejects_alexnet_below_63_px():
    proc = run(["python", "-m", "pipeline", "summary", "-m", "alexnet", "--image-size", "32"], ROOT, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --image-size 32: alexnet needs at least 63 px"


def test_models_lists_ours_and_timm():
    out = run(["python", "-m", "pipeline", "models", "alex*"], ROOT).stdout
    assert out.splitlines()[1].startswith("alexnet") and "1 models matching 'alex*'" in out
    assert "resnet50" in run(["python", "-m", "pipeline", "models", "resnet*"], ROOT).stdout


def test_summary_counts_each_module_with_its_children():
    cmd = ["python", "-m", "pipeline", "summary", "-m", "resnet18", "--num-classes", "7", "--depth", "1"]
    out = run(cmd, ROOT).stdout
    rows = {line.split()[0]: int(line.split()[-1].replace(",", "")) for line in out.splitlines()
            if line[:1].isalpha() and line.split()[-1].replace(",", "").isdigit()}
    assert rows["layer1"] == 147_968 and rows["layer4"] == 8_393_728  # 2 BasicBlocks each, not 0
    assert sum(rows.values()) == 11_176_512 + 7 * 512 + 7  # the rows at one depth add up to the total


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
