"""The registry: every family builds, runs, and trains every parameter; unknown names help."""
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.core.errors import UserError
from pipeline.models import (
    REGISTRY,
    build_model,
    check_model_name,
    count_parameters,
    has_pretrained_weights,
    head_of,
    list_models,
    min_image_size,
)
from pipeline.core.params import parse_params
from pipeline.models.summary import summarize
from tests.conftest import ROOT

FAMILIES = [*REGISTRY, "resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto"]


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    size = max(32, min_image_size(name))
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(2)).backward()
    # every trainable parameter is reached by backward (timm zero-initialises the last BN of each
    # residual block, so some gradients are exactly 0 at init: reached, finite, is the check)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []
    assert head_of(model).out_features == 7


def test_alexnet_head_is_the_last_linear():
    model = build_model("alexnet", num_classes=5)
    assert head_of(model) is model.classifier[6]
    assert model.classifier[1].out_features == 4096  # the first Linear keeps its size


def test_original_works_at_the_smallest_image_size():
    assert build_model("original", num_classes=3)(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_unknown_model_lists_close_matches():
    with pytest.raises(UserError) as exc:
        check_model_name("efficientnet-b0")
    assert "efficientnet_b0" in str(exc.value) and "original" in str(exc.value) and "alexnet" in str(exc.value)
    with pytest.raises(UserError, match="python -m pipeline models"):
        check_model_name("zzzzzz")


def test_list_models():
    assert list_models("alex*") == ["alexnet"]
    assert "resnet18" in list_models("resnet*") and "original" not in list_models("resnet*")


def test_alexnet_below_63_px_fails_at_params_validation():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text()) | {"model": "alexnet", "image_size": 32}
    with pytest.raises(UserError, match="image_size=32: alexnet needs at least 63"):
        parse_params(raw)
    assert parse_params(raw | {"image_size": 64}).model == "alexnet"


@pytest.mark.parametrize("name", FAMILIES)
def test_parameters_counted_from_the_structure_equal_the_built_model(name):
    built = build_model(name, num_classes=7)
    assert count_parameters(name, num_classes=7) == sum(p.numel() for p in built.parameters())


def test_pretrained_weights_exist_for_alexnet_and_timm_models_with_weights_only():
    assert has_pretrained_weights("alexnet") and has_pretrained_weights("resnet18")
    assert not has_pretrained_weights("original") and not has_pretrained_weights("coatnet_0_224")


def test_summary_rows_include_children_and_parameters_held_by_a_parent():
    class WithToken(torch.nn.Module):  # like a ViT: a parameter of its own next to child modules
        def __init__(self):
            super().__init__()
            self.token = torch.nn.Parameter(torch.zeros(1, 4))
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1))
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)) + self.token)

    rows = {path: (kind, n) for path, kind, _, n in summarize(WithToken(), "toy", 8, 2).rows}
    assert rows["token"] == ("Parameter", 4)
    assert rows["body"] == ("Sequential", (3 * 4 * 9 + 4) + (4 * 4 + 4)) and rows["body.0"] == ("Conv2d", 3 * 4 * 9 + 4)
    top = [n for path, (_, n) in rows.items() if "." not in path]
    assert sum(top) == sum(p.numel() for p in WithToken().parameters())
