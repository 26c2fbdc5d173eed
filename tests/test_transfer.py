"""Transfer learning: which parameters train under each strategy, frozen BatchNorm statistics,
weights from a local file (ours, from a real training run), offline pretrained errors."""
import numpy as np
import pytest
import torch

from pipeline.augment import AugmentConfig
from pipeline.checkpoint import save_checkpoint
from pipeline.errors import UserError
from pipeline.models import build_model
from pipeline.train import TrainConfig, seed_everything, train
from tests.conftest import ROOT, run
from pipeline.transfer import (apply_trainable, build_transfer_model, freeze_batchnorm_stats, head_parameter_names,
                               trainable_names)


def names_for(model, strategy, stages=1, epoch=1, head_epochs=1):
    return trainable_names(model, strategy, stages, epoch, head_epochs)


def test_strategies_select_exactly_the_right_parameters():
    model = build_model("resnet18", num_classes=4)
    everything = {n for n, _ in model.named_parameters()}
    assert head_parameter_names(model) == {"fc.weight", "fc.bias"}
    assert names_for(model, "full") == everything
    assert names_for(model, "linear_probe") == {"fc.weight", "fc.bias"}
    partial = names_for(model, "partial", stages=1)
    assert partial == {n for n in everything if n.startswith(("layer4.", "fc."))}
    assert names_for(model, "partial", stages=2) == {n for n in everything if n.startswith(("layer3.", "layer4.", "fc."))}
    assert names_for(model, "two_phase", epoch=1, head_epochs=2) == {"fc.weight", "fc.bias"}
    assert names_for(model, "two_phase", epoch=3, head_epochs=2) == everything
    with pytest.raises(UserError, match="has 4 stages"):
        names_for(model, "partial", stages=9)


def test_alexnet_and_original_heads():
    alex = build_model("alexnet", num_classes=3)
    assert names_for(alex, "linear_probe") == {"classifier.6.weight", "classifier.6.bias"}
    cnn = build_model("original", num_classes=3)
    assert names_for(cnn, "linear_probe") == {"head.weight", "head.bias"}
    assert names_for(cnn, "partial", stages=1) == {n for n, _ in cnn.named_parameters()
                                                   if n.startswith(("features.14", "features.15", "features.16",
                                                                    "features.17", "features.18", "features.19",
                                                                    "features.20", "head."))}


def test_linear_probe_trains_only_the_head_and_keeps_bn_statistics():
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 3, 8, 8)).astype(np.uint8)
    y = np.arange(32) % 2
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=0, augment=AugmentConfig(random_crop=False),
                      finetune="linear_probe", num_threads=1)
    result = train(model, (x, y), (x, y), [0.5] * 3, [0.3] * 3, cfg, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k]) and "num_batches_tracked" not in k}
    assert changed == {"head.weight", "head.bias"}  # running_mean/var of frozen BN unchanged too
    assert set(result.history["trainable_params"]) == {8 * 4 * 2 + 2}


def test_two_phase_unfreezes_after_the_head_epochs():
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    x = np.random.default_rng(0).integers(0, 256, (16, 3, 8, 8)).astype(np.uint8)
    y = np.arange(16) % 2
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=0, augment=AugmentConfig(random_crop=False),
                      finetune="two_phase", head_epochs=1, backbone_lr_mult=0.1, num_threads=1)
    history = train(model, (x, y), (x, y), [0.5] * 3, [0.3] * 3, cfg, progress=False).history
    total = sum(p.numel() for p in model.parameters())
    assert list(history["trainable_params"]) == [8 * 4 * 2 + 2, total, total]


def test_freeze_batchnorm_stats_only_where_frozen():
    model = build_model("original", num_classes=2, width=8)
    apply_trainable(model, names_for(model, "partial", stages=1))
    model.train()
    freeze_batchnorm_stats(model)
    modes = [m.training for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert modes == [False, False, False, False, True, True]


def test_fine_tune_from_a_checkpoint_of_another_task(tmp_path):
    # task A: 10 classes; its trained checkpoint is the weights file for task B: 3 classes
    seed_everything(1)
    a = build_model("original", num_classes=10, width=8)
    x = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8)).astype(np.uint8)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=1, augment=AugmentConfig(random_crop=False), num_threads=1)
    res = train(a, (x, np.arange(40) % 10), (x, np.arange(40) % 10), [0.5] * 3, [0.3] * 3, cfg, progress=False)
    path = tmp_path / "a.pt"
    save_checkpoint(path, arch="original", arch_kwargs={"num_classes": 10, "width": 8}, state_dict=res.best_state,
                    classes=[str(i) for i in range(10)], mean=[0.5] * 3, std=[0.3] * 3, image_size=8, params={},
                    summary={})
    seed_everything(2)
    b, prep = build_transfer_model("original", 3, False, str(path), {"width": 8})
    assert prep is None
    for name, value in b.state_dict().items():
        if name.startswith("head."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, res.best_state[name]), name  # the backbone starts from task A
    with pytest.raises(UserError, match="none of its tensors fit"):
        build_transfer_model("resnet18", 3, False, str(path), {})


def test_missing_weights_file_and_offline_hub_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_transfer_model("resnet18", 3, False, str(tmp_path / "nope.pth"), {})
    # the hub client reads HF_HUB_OFFLINE when imported: a fresh process, as a user's offline run
    code = ("from pipeline.errors import run_cli\nfrom pipeline.transfer import build_transfer_model\n"
            "run_cli(lambda: build_transfer_model('resnet18', 3, True, None, {}))")
    proc = run(["python", "-c", code], ROOT, check=False, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot get pretrained weights for resnet18" in lines[0] and "weights: PATH" in lines[0]


def test_timm_state_dict_file_with_pretrained_preprocessing(tmp_path):
    ref = build_model("resnet18", num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model, prep = build_transfer_model("resnet18", 5, True, str(tmp_path / "resnet18.pth"), {})
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
    assert torch.equal(model.conv1.weight, ref.conv1.weight) and model.fc.out_features == 5
