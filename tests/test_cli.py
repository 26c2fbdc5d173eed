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
    assert out.splitlines()[0].startswith("alexnet") and "1 models matching 'alex*'" in out
    assert "resnet50" in run(["python", "-m", "pipeline", "models", "resnet*"], ROOT).stdout
