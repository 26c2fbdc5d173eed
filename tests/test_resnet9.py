"""ResNet-9 (Page, Myrtle.ai): Page's architecture, timm's interface as the pipeline uses it
(Grad-CAM, the linear probe, partial unfreezing, ONNX export), and a tiny one that learns digits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import predict_logits
from pipeline.evaluation.gradcam import grad_cam
from pipeline.export.onnx import (
    MAX_ABS_DIFF,
    check_parity,
    export_onnx,
    onnx_logits,
    parity,
)
from pipeline.models import (
    build_model,
    count_parameters,
    head_parameter_names,
    min_image_size,
    pre_logits,
)
from pipeline.core.params import AugmentParams, TrainParams
from pipeline.models.resnet9 import LOGIT_SCALE
from pipeline.prepared import load_preprocessing, load_split
from pipeline.training.loop import TrainConfig, seed_everything, train
from pipeline.training.strategy import Strategy
from pipeline.training.transfer import trainable_names

TINY = {"width": 0.25}  # 16/32/64/128 channels: ~0.4 M parameters


def test_pages_architecture_at_width_1():
    model = build_model("resnet9", num_classes=10).eval()
    # dawn.py's 6,573,120 weights, plus the head's 10 biases (the linear probe re-fits a bias)
    assert count_parameters("resnet9", num_classes=10) == 6_573_130
    assert [f["num_chs"] for f in model.feature_info] == [64, 128, 256, 512]
    x = torch.randn(2, 3, 32, 32)
    fmap = model.forward_features(x)
    assert fmap.shape == (2, 512, 4, 4)  # three max-pools: dawn.py's MaxPool2d(4) is global here
    expected = model.head(fmap.amax(dim=(2, 3)) * LOGIT_SCALE)  # global max-pool, ×0.125, linear
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("size", [8, 16, 32, 40])
def test_output_shape_at_any_size_from_the_minimum(size):
    assert min_image_size("resnet9") == 8
    model = build_model("resnet9", num_classes=7, **TINY)
    assert model(torch.randn(3, 3, size, size)).shape == (3, 7)


def test_every_parameter_gets_a_nonzero_gradient():
    torch.manual_seed(0)
    model = build_model("resnet9", num_classes=5, **TINY).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (8, 5) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(8) % 5).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_constructor_options():
    model = build_model("resnet9", num_classes=3, in_chans=1, drop_rate=0.3, width=0.5)
    assert model.dropout.p == 0.3 and model.prep.conv.in_channels == 1 and model.num_features == 256
    assert build_model("resnet9", num_classes=3).dropout.p == 0.0  # Page's recipe has no dropout
    with pytest.raises(TypeError):  # train.drop_path: the train stage turns this into a one-line error
        build_model("resnet9", num_classes=3, drop_path_rate=0.1)


def test_the_head_maps_pre_logits_to_the_logits_and_stages_unfreeze_from_the_end():
    model = build_model("resnet9", num_classes=4, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the linear probe re-fits get_classifier() on pre_logits: it must be all the head
        torch.testing.assert_close(model.get_classifier()(pre_logits(model, x)), model(x))
    assert head_parameter_names(model) == {"head.weight", "head.bias"}
    names = {n for n, _ in model.named_parameters()}
    partial = lambda stages: trainable_names(model, Strategy("partial", unfreeze_stages=stages), 1)  # noqa: E731
    assert partial(1) == {n for n in names if n.startswith(("layer3.", "head."))}
    assert partial(3) == {n for n in names if not n.startswith("prep.")}
    assert partial(4) == names


def test_gradcam_explains_layer3s_map():
    torch.manual_seed(0)
    model = build_model("resnet9", num_classes=4, **TINY)
    heat, logits = grad_cam(model, torch.randn(3, 3, 32, 32))
    assert heat.shape == (3, 32, 32) and logits.shape == (3, 4)
    assert torch.isfinite(heat).all() and heat.amax() == 1.0 and heat.amin() < 1.0  # not a flat map


@pytest.fixture(scope="module")
def trained_tiny(prepared_digits):
    """A width-0.25 ResNet-9 after 2 epochs of the CIFAR recipe (SGD Nesterov, one-cycle, label
    smoothing 0.2) on digits at 16 px, through the real training loop."""
    seed_everything(0)
    model = build_model("resnet9", num_classes=10, **TINY)
    train_xy, val_xy = load_split("train", prepared_digits), load_split("val", prepared_digits)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.2, seed=0, augment=AugmentParams(crop_padding=2),
                      train=TrainParams(optimizer="sgd", scheduler="onecycle", label_smoothing=0.2, num_threads=1))
    result = train(model, train_xy, val_xy, load_preprocessing(prepared_digits), cfg, progress=False)
    model.load_state_dict(result.best_state)
    return model.eval(), result


def test_tiny_resnet9_learns_digits(trained_tiny, prepared_digits):
    model, result = trained_tiny
    x, y = load_split("test", prepared_digits)
    test_acc = (predict_logits(model, x, load_preprocessing(prepared_digits)).argmax(1) == y).mean()
    assert result.metrics["best_val_accuracy"] > 0.85 and test_acc > 0.85, (result.metrics, test_acc)  # chance: 0.1; seeds 0-2 reach 0.95-0.98


def test_onnx_export_agrees_with_pytorch(trained_tiny, prepared_digits, tmp_path):
    model, _ = trained_tiny
    prep = load_preprocessing(prepared_digits)
    x, _ = load_split("test", prepared_digits)
    export_onnx(model, prep.image_size, tmp_path / "resnet9.onnx")
    ort = onnx_logits(tmp_path / "resnet9.onnx", prep.model_input(np.array(x[:64])))
    result = parity(predict_logits(model, x[:64], prep), ort)
    check_parity(result)
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] <= MAX_ABS_DIFF


def test_linear_probe_on_the_frozen_backbone(prepared_digits):
    """finetune: linear_probe re-fits get_classifier() (weight and bias) on cached pre_logits."""
    from pipeline.training.probe import train_linear_probe

    seed_everything(0)
    model = build_model("resnet9", num_classes=10, **TINY)  # random and frozen: its features still separate digits
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    prep = load_preprocessing(prepared_digits)
    cfg = TrainConfig(epochs=10, batch_size=64, lr=0.01, seed=0, strategy=Strategy("linear_probe"),
                      train=TrainParams(num_threads=1))
    result = train_linear_probe(model, load_split("train", prepared_digits), load_split("val", prepared_digits), prep, cfg,
                                progress=False)
    model.load_state_dict(result.best_state)
    x, y = load_split("test", prepared_digits)
    assert (predict_logits(model, x, prep).argmax(1) == y).mean() > 0.8  # 0.956 with seed 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
