"""What the check stage refuses before any output is touched, or makes work: a model at a size
it cannot take, options it does not take, `pretrained: true` without its weights and no way to
download them; a ViT at another size is built for it, with its position embedding resampled."""
import time
from pathlib import Path

import pytest
import torch

from pipeline.models.registry import arch_kwargs, build_model, build_problem
from tests.conftest import run, set_params


def test_a_model_that_cannot_take_the_size_or_the_options_is_refused():
    assert "cannot take 30 px images" in build_problem("levit_128", 30, arch_kwargs("levit_128", 10, 30))
    assert "does not take these options" in build_problem("original", 32, arch_kwargs("original", 10, 32,
                                                                                        drop_path=0.1))
    assert build_problem("resnet18", 32, arch_kwargs("resnet18", 10, 32, dropout=0.2, drop_path=0.1)) is None


def test_a_vit_is_built_for_another_size_and_keeps_its_position_embedding():
    """timm builds a ViT for one input size; at another, `img_size` makes it, and weights made for
    224 px load with their position embedding resampled to the new grid, not dropped."""
    import timm

    from pipeline.models.weights import load_matching

    kwargs = arch_kwargs("vit_tiny_patch16_224", 3, 112)
    assert kwargs["img_size"] == 112 and build_problem("vit_tiny_patch16_224", 112, kwargs) is None
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5)
    model = build_model("vit_tiny_patch16_224", **kwargs)
    assert "pos_embed" in load_matching(model, source.state_dict(), "test")
    assert model.pos_embed.shape[1] == 1 + 7 * 7
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 3)


def check(project: Path, **env: str):
    return run(["python", "-m", "stages.check"], project, check=False, **env)


@pytest.fixture
def hub_offline(tmp_path: Path) -> dict[str, str]:
    """An empty hub cache and a hub endpoint nothing listens on (this machine may have no network at all)."""
    return {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9",
            "TORCH_HOME": str(tmp_path / "torch")}


def test_pretrained_weights_that_cannot_be_downloaded_are_one_line_in_seconds(project: Path, hub_offline):
    set_params(project, model="resnet18", pretrained=True)
    started = time.perf_counter()
    proc = check(project, **hub_offline)
    assert time.perf_counter() - started < 30  # the hub's own retries took ~50 s
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and "not in the local cache and cannot be downloaded" in line
    assert "weights: PATH" in line and not (project / "data/resolved").exists()


def test_pretrained_weights_in_the_hub_cache_pass_check(project: Path, hub_offline):
    """Where timm would find them (the Hugging Face cache's layout), offline."""
    snapshot = Path(hub_offline["HF_HUB_CACHE"]) / "models--timm--resnet18.a1_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs/main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snapshot / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"weights")
    set_params(project, model="resnet18", pretrained=True)
    proc = check(project, **hub_offline)
    assert proc.returncode == 0, proc.stderr
    assert "ImageNet weights of resnet18: in the local cache" in proc.stdout
