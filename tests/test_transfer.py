"""Transfer learning: which parameters train under each strategy, frozen BatchNorm statistics,
weights from a local file (ours, from a real training run), offline pretrained errors."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.core.errors import UserError
from pipeline.core.params import AugmentParams, TrainParams
from pipeline.core.preprocess import Preprocessing
from pipeline.models import build_model, head_parameter_names
from pipeline.models.weights import build_transfer_model, resolve_preprocessing
from pipeline.training.loop import TrainConfig, seed_everything, train
from pipeline.training.strategy import Strategy
from pipeline.training.transfer import apply_trainable, freeze_batchnorm_stats, trainable_names
from tests.conftest import ROOT, plain, run

ONE_THREAD = TrainParams(num_threads=1)


def names_for(model, strategy, stages=1, epoch=1, head_epochs=1):
    return trainable_names(model, Strategy(strategy, unfreeze_stages=stages, head_epochs=head_epochs), epoch)


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
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=0, augment=AugmentParams(random_crop=False),
                      strategy=Strategy("linear_probe"), train=ONE_THREAD)
    result = train(model, (x, y), (x, y), plain(x), cfg, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k]) and "num_batches_tracked" not in k}
    assert changed == {"head.weight", "head.bias"}  # running_mean/var of frozen BN unchanged too
    assert set(result.history["trainable_params"]) == {8 * 4 * 2 + 2}


def test_two_phase_unfreezes_after_the_head_epochs():
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    x = np.random.default_rng(0).integers(0, 256, (16, 3, 8, 8)).astype(np.uint8)
    y = np.arange(16) % 2
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, seed=0, augment=AugmentParams(random_crop=False),
                      strategy=Strategy("two_phase", head_epochs=1, backbone_lr_mult=0.1), train=ONE_THREAD)
    history = train(model, (x, y), (x, y), plain(x), cfg, progress=False).history
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
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=1, augment=AugmentParams(random_crop=False), train=ONE_THREAD)
    res = train(a, (x, np.arange(40) % 10), (x, np.arange(40) % 10), plain(x), cfg, progress=False)
    path = tmp_path / "a.pt"
    save_checkpoint(path, arch="original", arch_kwargs={"num_classes": 10, "width": 8}, state_dict=res.best_state,
                    classes=[str(i) for i in range(10)], prep=plain(x), params={}, summary={})
    seed_everything(2)
    b, loaded = build_transfer_model("original", 3, False, str(path), {"width": 8})
    assert loaded
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
    code = ("from pipeline.core.errors import run_cli\nfrom pipeline.models.weights import build_transfer_model\n"
            "run_cli(lambda: build_transfer_model('resnet18', 3, True, None, {}))")
    proc = run(["python", "-c", code], ROOT, check=False, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot get pretrained weights for resnet18" in lines[0] and "weights: PATH" in lines[0]


def test_timm_state_dict_file_with_pretrained_preprocessing(tmp_path):
    ref = build_model("resnet18", num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model, _ = build_transfer_model("resnet18", 5, False, str(tmp_path / "resnet18.pth"), {})
    prep = resolve_preprocessing("resnet18", False, str(tmp_path / "resnet18.pth"), "auto", "center_crop").to_dict()
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
    assert torch.equal(model.conv1.weight, ref.conv1.weight) and model.fc.out_features == 5


# --- weights bring their preprocessing; a neutral head; the cached-feature probe (issue 9) -----


def lite0_weights(tmp_path) -> str:
    """A state dict of timm's tf_efficientnet_lite0 (random weights, 1,000 classes), as a user's
    downloaded ImageNet file would be; its pretrained config: mean = std = 0.5, crop_pct 0.875."""
    path = tmp_path / "lite0.pth"
    torch.save(build_model("tf_efficientnet_lite0", num_classes=1000).state_dict(), path)
    return str(path)


def test_preprocessing_follows_the_weights(tmp_path):
    weights = lite0_weights(tmp_path)
    # a timm state dict alone (no pretrained: true) brings the model's pretrained config
    prep = resolve_preprocessing("tf_efficientnet_lite0", False, weights, "auto", "center_crop")
    assert (prep.mean, prep.std, prep.image_size, prep.stored_size) == ((0.5,) * 3, (0.5,) * 3, 224, 256)
    assert prep.interpolation == "bicubic" and prep.source == "pretrained:tf_efficientnet_lite0"
    assert "pretrained config" in prep.reason and "weights" in prep.reason
    # pretrained: true: the same config, no network needed to know it
    hub = resolve_preprocessing("resnet18", True, None, 128, "center_crop")
    assert hub.mean == (0.485, 0.456, 0.406) and hub.image_size == 128 and hub.stored_size == int(128 / 0.95)
    # from scratch: the data set's statistics, filled in by prepare
    scratch = resolve_preprocessing("tf_efficientnet_lite0", False, None, "auto", "stretch")
    assert scratch.mean is None and (scratch.image_size, scratch.stored_size, scratch.resize) == (32, 32, "stretch")
    assert scratch.with_stats([0.1] * 3, [0.2] * 3).mean == (0.1,) * 3
    # one of our checkpoints: the preprocessing recorded in it
    recorded = Preprocessing(48, 54, "center_crop", "bicubic", (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), "data", "")
    model = build_model("original", num_classes=3, width=8)
    save_checkpoint(tmp_path / "ours.pt", arch="original", arch_kwargs={"num_classes": 3, "width": 8},
                    state_dict=model.state_dict(), classes=["a", "b", "c"], prep=recorded, params={}, summary={})
    ours = resolve_preprocessing("original", False, str(tmp_path / "ours.pt"), "auto", "center_crop")
    assert (ours.mean, ours.std, ours.image_size, ours.stored_size) == (recorded.mean, recorded.std, 48, 54)
    assert ours.source.startswith("checkpoint:") and Preprocessing.from_dict(ours.to_dict()) == ours


def test_a_remade_head_starts_neutral(tmp_path):
    """The first loss of a fine-tune is ln K: every class starts at probability 1/K (timm's
    EfficientNet head init would start a 2-class head at a loss of ~2.5)."""
    model, loaded = build_transfer_model("tf_efficientnet_lite0", 2, False, lite0_weights(tmp_path), {})
    assert loaded
    x = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.eval()(x), torch.arange(16) % 2)
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)
    scratch = build_model("tf_efficientnet_lite0", num_classes=2)  # from scratch the head keeps timm's init
    assert scratch.get_classifier().weight.abs().sum() > 0


def digits_split(prepared):
    from pipeline.prepared import load_meta, load_split

    meta = load_meta(prepared)
    return (load_split("train", prepared), load_split("val", prepared), load_split("test", prepared),
            Preprocessing.from_dict(meta["preprocessing"]))


def probe_config(**kw):
    return TrainConfig(epochs=15, batch_size=64, lr=0.01, seed=0, strategy=Strategy("linear_probe", **kw),
                       train=ONE_THREAD)


def test_cached_feature_probe_matches_fitting_the_head_directly(prepared_digits):
    """The probe runs the frozen backbone once per image, and its head is as good as a
    logistic regression fitted on the same features."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.checkpoint import predict_logits
    from pipeline.training.probe import extract_features, train_linear_probe

    train_xy, val_xy, (x_test, y_test), prep = digits_split(prepared_digits)
    seed_everything(0)
    model = build_model("original", num_classes=10, width=8)  # a random frozen backbone: features still separate digits
    calls = []
    model.features[0].register_forward_hook(lambda m, i, o: calls.append(len(i[0])))  # the first convolution
    result = train_linear_probe(model, train_xy, val_xy, prep, probe_config(), progress=False)
    assert sum(calls) == len(train_xy[1]) + len(val_xy[1])  # each image through the backbone once, for 15 epochs
    model.load_state_dict(result.best_state)
    probe_acc = (predict_logits(model, x_test, prep).argmax(1) == y_test).mean()
    f = {s: extract_features(model, x, prep) for s, x in (("train", train_xy[0]), ("test", x_test))}
    mean, std = f["train"].mean(0), f["train"].std(0) + 1e-6
    clf = LogisticRegression(C=1 / (result.metrics["probe_l2"] * len(train_xy[1])), max_iter=5000)
    direct = clf.fit((f["train"] - mean) / std, train_xy[1]).score((f["test"] - mean) / std, y_test)
    assert probe_acc > 0.8 and abs(probe_acc - direct) <= 0.02, (probe_acc, direct)
    # the backbone did not move: only the head differs from the model's initial weights
    seed_everything(0)
    fresh = build_model("original", num_classes=10, width=8)
    changed = {k for k, v in fresh.state_dict().items() if not torch.equal(v, result.best_state[k])}
    assert changed <= {"head.weight", "head.bias"}


def test_probe_is_deterministic(prepared_digits):
    from pipeline.training.probe import train_linear_probe

    train_xy, val_xy, _, prep = digits_split(prepared_digits)
    states = []
    for _ in range(2):
        seed_everything(0)
        model = build_model("original", num_classes=10, width=8)
        states.append(train_linear_probe(model, train_xy, val_xy, prep, probe_config(augmented_passes=2),
                                         progress=False).best_state)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_random_resized_crop_per_sample_and_centre_crop_for_evaluation():
    from pipeline.training.augment import augment_batch, random_resized_crop

    x = (torch.arange(3 * 36 * 36).reshape(1, 3, 36, 36) % 251).to(torch.uint8).expand(32, -1, -1, -1).clone()
    gen = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, 32, (0.25, 1.0), (0.75, 4 / 3), gen)
    assert out.shape == (32, 3, 32, 32) and out.dtype == torch.float32
    assert len({o.sum().item() for o in out}) > 20  # a box per image
    full = random_resized_crop(x[:2], 36, (1.0, 1.0), (1.0, 1.0))  # the whole image, same size
    assert torch.equal(full, x[:2].float() / 255)
    aug = augment_batch(x, AugmentParams(random_crop=False), [0.5] * 3, gen, size=32, resized=False)
    assert torch.equal(aug, x[:, :, 2:34, 2:34].float() / 255)  # no resized crop: the centre
    prep = Preprocessing(32, 36, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.equal(prep.center_crop(x), x[:, :, 2:34, 2:34])


def test_random_resized_crop_is_torchvisions_on_a_cpu():
    """Each crop, bit for bit, what torchvision's v2 `resized_crop` (antialiased) gives the
    uint8 image for the same box, mirrored where the draw after the boxes says so (the draws
    `random_hflip` would make with the same generator)."""
    from torchvision.transforms.v2 import functional as TF

    from pipeline.training.augment import _rand, crop_boxes, random_resized_crop

    x = torch.randint(0, 256, (8, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = random_resized_crop(x, 24, (0.08, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(1), hflip=True)
    gen = torch.Generator().manual_seed(1)
    boxes = zip(*(v.long().tolist() for v in crop_boxes(8, 40, 48, (0.08, 1.0), (0.75, 4 / 3), gen)))
    mirror = (_rand(8, gen, "cpu") < 0.5).tolist()
    assert 0 < sum(mirror) < 8
    for crop, (left, top, w, h), m, image in zip(crops, boxes, mirror, x):
        reference = TF.resized_crop(image, top, left, h, w, [24, 24], antialias=True)
        assert torch.equal(crop, (reference.flip(-1) if m else reference).float() / 255)


def test_sampled_crops_take_the_points_torchvisions_roi_align_samples():
    """A GPU's crops, one grid_sample for the batch: the points torchvision's roi_align samples
    (aligned, one sample per output pixel) on the same boxes, mirrored where asked."""
    from torchvision.ops import roi_align

    from pipeline.training.augment import _sampled_crops, crop_boxes

    x = torch.rand(8, 3, 40, 48)
    left, top, bw, bh = crop_boxes(8, 40, 48, (0.08, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(1))
    mirror = torch.tensor([True, False] * 4)
    crops = _sampled_crops(x, 24, (left, top, bw, bh), torch.zeros(8, dtype=torch.bool))
    boxes = torch.stack([torch.arange(8.0), left, top, left + bw, top + bh], 1)
    reference = roi_align(x, boxes, (24, 24), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    assert torch.allclose(crops, reference, atol=1e-5)
    mirrored = _sampled_crops(x, 24, (left, top, bw, bh), mirror)
    assert torch.allclose(mirrored, torch.where(mirror[:, None, None, None], crops.flip(-1), crops), atol=1e-5)


def test_the_probe_says_what_trains_and_how_fast_the_backbone_ran(prepared_digits, capsys):
    """What a person reads of a linear probe: the head's parameters out of the whole model's
    (not "N of N ... (full)"), and the frozen backbone's images/s as its speed (not the head's
    steps on cached features, thousands of "images"/s)."""
    from pipeline.training.probe import train_linear_probe

    train_xy, val_xy, _, prep = digits_split(prepared_digits)
    seed_everything(0)
    model = build_model("original", num_classes=10, width=8)
    total, head = (sum(p.numel() for p in m.parameters()) for m in (model, model.head))
    result = train_linear_probe(model, train_xy, val_xy, prep, probe_config(probe_l2=0.01),
                                progress=True)
    out = capsys.readouterr().out
    assert f"{head:,} of {total:,} parameters train (linear probe: the head, on cached features)" in out, out
    t = result.timing
    images = len(train_xy[1]) + len(val_xy[1])
    assert t["train_images_per_second"] == t["feature_images_per_second"] == pytest.approx(images / t["feature_seconds"])
    assert t["train_seconds"] >= t["feature_seconds"] + t["head_seconds"] * 0.99
    assert "images/s); training the head on them" in out


def test_a_probe_without_augmentation_shows_none_in_its_picture(prepared_digits, tmp_path):
    """augmented_samples.png (a DVC output of train) says there was no augmentation instead of
    showing augmentation a probe on unaugmented features never used; the report leaves it out."""
    from PIL import Image

    from pipeline.training.run import augmented_samples

    train_xy, val_xy, _, prep = digits_split(prepared_digits)
    setup = SimpleNamespace(cfg=probe_config(), prep=prep, classes=[str(i) for i in range(10)])
    originals, augmented = augmented_samples(setup, tmp_path / "none.png", prepared_digits)
    assert len(originals) == len(augmented) == 0
    with Image.open(tmp_path / "none.png") as small:
        assert small.size[1] < 200  # one line of text, not a grid of images
    setup.cfg = probe_config(augmented_passes=1)
    originals, _ = augmented_samples(setup, tmp_path / "grid.png", prepared_digits)
    assert len(originals) == 24
    assert not Strategy("linear_probe").trains_on_augmented_images
    assert Strategy("linear_probe", augmented_passes=2).trains_on_augmented_images
    assert Strategy("full").trains_on_augmented_images


def test_the_strategy_is_resolved_once_from_the_params():
    """`Strategy.resolve`: what each finetune trains per epoch, the backbone's lr multiplier and
    frozen BatchNorm statistics only with loaded weights, cached features and DDP, `lr: auto`."""
    from pipeline.core.params import parse_params

    def resolve(**raw):
        return Strategy.resolve(parse_params({"transfer": {"head_epochs": 2, "unfreeze_stages": 2}} | raw,
                                             check_models=False))

    scratch = resolve()
    assert (scratch.transferred, scratch.backbone_lr_mult, scratch.frozen_bn_stats) == (False, 1.0, False)
    assert scratch.trains(1) == "all" and scratch.parallel and not scratch.freezes_parameters
    assert scratch.augment(AugmentParams()).resized_crop is False
    assert scratch.auto_lr("adamw", True)[0] == 3e-3 and scratch.auto_lr("adamw", False)[0] == 1e-3
    partial = resolve(weights="w.pt", finetune="partial")
    assert (partial.backbone_lr_mult, partial.frozen_bn_stats, partial.unfreeze_stages) == (0.1, True, 2)
    assert partial.trains(1) == "stages" and partial.augment(AugmentParams()).resized_crop is True
    assert partial.augment(AugmentParams(resized_crop=False)).resized_crop is False
    assert partial.auto_lr("sgd", True)[0] == 0.02
    two = resolve(pretrained=True, finetune="two_phase", epochs=5)
    assert [two.trains(e) for e in (1, 2, 3)] == ["head", "head", "all"] and two.unfrozen_from == 3
    probe = resolve(weights="w.pt", finetune="linear_probe")
    assert probe.cached_features and not probe.parallel and not probe.trains_on_augmented_images
    assert probe.trains(1) == "head" and probe.head_epochs == 0 and probe.auto_lr("adamw", True)[0] == 1e-2
