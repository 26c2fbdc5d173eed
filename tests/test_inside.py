"""Seeing inside the model: activations, filters with feature visualisation, the t-SNE embedding.
Real models (our small CNN untrained and trained on digits at 16 px, AlexNet, timm CNNs, a
vision transformer), real matplotlib and scikit-learn; PNGs read back with PIL."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.preprocess import Preprocessing
from pipeline.evaluation import inside
from pipeline.models import build_model
from pipeline.prepared import load_meta, load_preprocessing, load_split


def png_size(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG" and img.convert("L").getextrema()[0] < 128  # something dark drawn
        return img.size


@pytest.fixture(scope="module")
def digits(prepared_digits):
    """(test images, labels, class names, preprocessing) of digits prepared at 16 px."""
    x, y = load_split("test", prepared_digits)
    return np.array(x), y, load_meta(prepared_digits)["classes"], load_preprocessing(prepared_digits)


@pytest.fixture(scope="module")
def trained_cnn(prepared_digits):
    """Our small CNN after 2 epochs on the digits training split (~0.95 test accuracy, ~2 s)."""
    torch.manual_seed(0)
    x, y = load_split("train", prepared_digits)
    prep = load_preprocessing(prepared_digits)
    model = build_model("original", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = prep.model_input(torch.from_numpy(np.array(x))), torch.from_numpy(y)
    for _ in range(2):
        for start in range(0, len(labels), 64):
            loss = F.cross_entropy(model(inputs[start:start + 64]), labels[start:start + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def model_probs(model, x, prep) -> np.ndarray:
    from pipeline.checkpoint import predict_logits

    return torch.softmax(torch.from_numpy(predict_logits(model, x, prep)), 1).numpy()


@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "trained"])
def test_all_three_on_digits_at_16px(tmp_path, digits, trained_cnn, trained):
    x, y, classes, prep = digits
    torch.manual_seed(0)
    model = trained_cnn if trained else build_model("original", num_classes=10).eval()
    probs = model_probs(model, x, prep)
    assert inside.activations_figure(model, x, y, classes, prep, tmp_path / "act.png") is None
    assert inside.filters_figure(model, prep, tmp_path / "fil.png", steps=12) is None
    assert inside.embedding_figure(model, x, y, probs, classes, prep, tmp_path / "emb.png") is None
    assert png_size(tmp_path / "act.png") == inside.activations_png_size(10)
    assert png_size(tmp_path / "fil.png") == inside.filters_png_size(32, 8)
    assert png_size(tmp_path / "emb.png") == inside.EMBEDDING_PNG_SIZE


def test_same_inputs_same_bytes(tmp_path, digits, trained_cnn):
    x, y, classes, prep = digits
    probs = model_probs(trained_cnn, x, prep)
    for name in ("a", "b"):
        inside.embedding_figure(trained_cnn, x, y, probs, classes, prep, tmp_path / f"emb_{name}.png", max_points=120)
        inside.filters_figure(trained_cnn, prep, tmp_path / f"fil_{name}.png", steps=6)
    assert (tmp_path / "emb_a.png").read_bytes() == (tmp_path / "emb_b.png").read_bytes()
    assert (tmp_path / "fil_a.png").read_bytes() == (tmp_path / "fil_b.png").read_bytes()
    inside.embedding_figure(trained_cnn, x, y, probs, classes, prep, tmp_path / "emb_c.png", seed=1, max_points=120)
    assert (tmp_path / "emb_c.png").read_bytes() != (tmp_path / "emb_a.png").read_bytes()  # the seed matters


def test_saved_whole_they_are_the_bytes_a_tight_crop_gives(tmp_path, digits, trained_cnn, monkeypatch):
    """`save(..., whole=True)` skips "tight"'s layout pass; the pictures must not change."""
    from pipeline import plots
    from pipeline.evaluation.inside import activations, embedding, filters

    x, y, classes, prep = digits
    probs = model_probs(trained_cnn, x, prep)

    def draw(tag: str) -> list[bytes]:
        inside.activations_figure(trained_cnn, x, y, classes, prep, tmp_path / f"act_{tag}.png")
        inside.filters_figure(trained_cnn, prep, tmp_path / f"fil_{tag}.png", steps=6)
        inside.embedding_figure(trained_cnn, x, y, probs, classes, prep, tmp_path / f"emb_{tag}.png", max_points=120)
        return [(tmp_path / f"{n}_{tag}.png").read_bytes() for n in ("act", "fil", "emb")]

    whole = draw("whole")
    for module in (activations, embedding, filters):
        monkeypatch.setattr(module, "save", lambda fig, path, whole=False: plots.save(fig, path))
    assert draw("tight") == whole


def test_tsne_of_a_trained_model_separates_the_classes(digits, trained_cnn):
    x, y, _, prep = digits
    points, method = inside.tsne_2d(inside.penultimate(trained_cnn, x, prep), seed=0)
    assert points.shape == (len(y), 2) and "PCA to 50" in method and "128 dims" in method
    dist = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert (y[dist.argmin(1)] == y).mean() > 0.9  # a point's nearest neighbour is of its class


@pytest.mark.parametrize("name", ["original", "alexnet", "resnet18", "tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_one_pass_gives_the_logits_and_the_penultimate_features(name, digits, trained_cnn):
    """evaluate scores the test split and catches the head's input on the way: the same logits
    as `predict_logits`, the same features as `pre_logits` (the embedding's second pass, before)."""
    from pipeline.checkpoint import predict_logits, predict_logits_and_features

    x, _, _, prep = digits
    if name == "original":
        model, images = trained_cnn, x[:70]
    else:
        torch.manual_seed(0)
        size = 224 if name.startswith("vit") else 64
        model = build_model(name, num_classes=10, **({"img_size": size} if name.startswith("vit") else {})).eval()
        images = np.random.default_rng(0).integers(0, 256, (5, 3, size, size), dtype=np.uint8)
        prep = Preprocessing(image_size=size, stored_size=size, mean=(0.5,) * 3, std=(0.25,) * 3, reason="test")
    logits, features = predict_logits_and_features(model, images, prep, batch_size=32)
    np.testing.assert_array_equal(logits, predict_logits(model, images, prep, batch_size=32))
    np.testing.assert_allclose(features, inside.penultimate(model, images, prep, batch_size=32), rtol=1e-5, atol=1e-5)


def test_filters_figure_leaves_the_model_as_it_was(tmp_path, digits, trained_cnn):
    _, _, _, prep = digits
    model = trained_cnn.train()  # in training mode, the head frozen: both must survive
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.head.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        inside.filters_figure(model, prep, tmp_path / "fil.png", steps=6)
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    finally:
        model.head.requires_grad_(True)
        model.eval()


def test_feature_visualisation_excites_its_channels(digits, trained_cnn):
    """Each optimised image raises its channel's mean (pre-activation) above a grey image's and
    above every real test image's."""
    x, _, _, prep = digits
    target = inside.early_middle_late(inside.spatial_layers(inside.probe(trained_cnn, 16)))[1]
    chosen = np.array([0, 21, 42, 63])
    images = inside.maximise_channels(trained_cnn, target, chosen, prep, steps=24)
    assert images.shape == (4, 3, 16, 16) and images.dtype == np.uint8

    def response(imgs: np.ndarray) -> torch.Tensor:  # N×4: each image's mean of the chosen channels
        with torch.no_grad():
            (fmap,) = inside.capture(trained_cnn, prep.normalize(torch.from_numpy(imgs)), [target], before=True)
        return fmap[:, torch.from_numpy(chosen)].mean((2, 3))

    best = response(images).diagonal()
    grey = response(np.full_like(images[:1], round(255 * prep.mean[0])))[0]
    assert (best > grey).all() and (best > response(x).amax(0)).all(), (best, grey)


@pytest.mark.parametrize("name, size", [("alexnet", 64), ("resnet18", 32), ("tf_efficientnet_lite0", 64)])
def test_other_cnns(tmp_path, name, size, digits):
    x16, y, classes, _ = digits
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    prep = Preprocessing(size, size, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = F.interpolate(torch.from_numpy(x16[:40]).float(), size=size).round().to(torch.uint8).numpy()
    picked = inside.early_middle_late(inside.spatial_layers(inside.probe(model, size)))
    assert len(picked) == 3 and picked[0].shape[-1] > picked[-1].shape[-1] > 1  # resolution falls, stays a map
    assert all(layer.kind == "activation" for layer in picked)
    assert inside.activations_figure(model, x, y[:40], classes, prep, tmp_path / "act.png", max_classes=4) is None
    assert inside.filters_figure(model, prep, tmp_path / "fil.png", channels=4, steps=3) is None
    first_conv = next(layer for layer in inside.probe(model, size) if layer.kind == "conv")
    n_filters = model.get_submodule(first_conv.name).out_channels
    assert png_size(tmp_path / "act.png") == inside.activations_png_size(4)
    assert png_size(tmp_path / "fil.png") == inside.filters_png_size(n_filters, 4)


def test_vision_transformer_gets_notes(tmp_path, digits):
    x16, y, classes, _ = digits
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", num_classes=10, img_size=32).eval()
    prep = Preprocessing(32, 32, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = F.interpolate(torch.from_numpy(x16[:30]).float(), size=32).round().to(torch.uint8).numpy()
    note = inside.activations_figure(model, x, y[:30], classes, prep, tmp_path / "act.png")
    assert "VisionTransformer" in note and "no spatial feature maps" in note
    assert png_size(tmp_path / "act.png")  # the note picture
    note = inside.filters_figure(model, prep, tmp_path / "fil.png")  # the patch embedding's filters only
    assert "Feature visualisation skipped" in note and "patch_embed.proj" in note
    assert png_size(tmp_path / "fil.png") == inside.filters_png_size(192, 0)
    probs = np.eye(10)[y[:30]]
    assert inside.embedding_figure(model, x, y[:30], probs, classes, prep, tmp_path / "emb.png") is None
    assert png_size(tmp_path / "emb.png") == inside.EMBEDDING_PNG_SIZE


def test_too_few_images_for_an_embedding(tmp_path, digits, trained_cnn):
    x, y, classes, prep = digits
    note = inside.embedding_figure(trained_cnn, x[:4], y[:4], np.eye(10)[y[:4]], classes, prep, tmp_path / "emb.png")
    assert "4 test images" in note and png_size(tmp_path / "emb.png")
    assert inside.embedding_figure(trained_cnn, x[:5], y[:5], np.eye(10)[y[:5]], classes, prep,
                                   tmp_path / "emb5.png") is None  # 5 is enough


def test_sampling_and_picking():
    sample = inside.subsample(10_000, 2000, seed=0)
    assert len(sample) == len(np.unique(sample)) == 2000 and (np.diff(sample) > 0).all()
    assert (sample == inside.subsample(10_000, 2000, seed=0)).all()
    assert not (sample == inside.subsample(10_000, 2000, seed=1)).all()
    assert (inside.subsample(50, 2000, seed=0) == np.arange(50)).all()
    assert list(inside.first_of_each_class(np.array([2, 0, 2, 1, 0, 3]), 3)) == [1, 3, 0]  # classes 0, 1, 2


def test_channels_last_maps_are_recognised():
    assert inside._layout(torch.zeros(2, 64, 8, 8)) == "NCHW"
    assert inside._layout(torch.zeros(2, 8, 8, 96)) == "NHWC"       # ConvNeXt/Swin blocks
    assert inside._layout(torch.zeros(2, 64, 1, 1)) is None         # squeeze-excitation: no map
    assert inside._layout(torch.zeros(2, 3, 197, 64)) is None       # attention heads × tokens


def test_many_classes_get_names_that_do_not_overlap(tmp_path):
    """Over 20 classes: no legend, names at the clusters, the tightest first, none overlapping."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 100, (40, 2))
    y = np.repeat(np.arange(40), 10)
    points = centres[y] + rng.normal(0, np.where(y == 0, 0.2, 1.5)[:, None], (400, 2))  # class 0 the tightest
    fig, ax = inside.plt.subplots(figsize=(inside.EMB["side"],) * 2)
    ax.scatter(points[:, 0], points[:, 1])
    placed = inside._label_spots(ax, points, y)
    inside.plt.close(fig)
    box = np.array([0.9 * np.ptp(ax.get_xlim()), 0.16 * np.ptp(ax.get_ylim())]) / inside.EMB["side"]
    assert placed[0][0] == 0 and 10 < len(placed) <= 40
    for i, (_, a) in enumerate(placed):
        assert all((np.abs(a - b) >= box).any() for _, b in placed[:i])
    inside._draw_embedding(points, y, y % 7 == 0, [f"class {i}" for i in range(40)], "t-SNE", tmp_path / "emb.png")
    assert png_size(tmp_path / "emb.png") == inside.EMBEDDING_PNG_SIZE
