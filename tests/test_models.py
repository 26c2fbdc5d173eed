"""The registry: every family builds, runs, and trains every parameter; unknown names help."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.models import REGISTRY, build_model, check_model_name


@pytest.mark.parametrize("name", [*REGISTRY, "resnet18"])
def test_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(4)).backward()
    # every trainable parameter is reached by backward (timm zero-initialises the last BN of each
    # residual block, so some gradients are exactly 0 at init: reached, finite, is the check)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == []


def test_original_works_at_the_smallest_image_size():
    assert build_model("original", num_classes=3)(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_unknown_model_lists_close_matches():
    with pytest.raises(UserError) as exc:
        check_model_name("efficientnet-b0")
    assert "efficientnet_b0" in str(exc.value) and "original" in str(exc.value)
    with pytest.raises(UserError, match="timm.list_models"):
        check_model_name("zzzzzz")
