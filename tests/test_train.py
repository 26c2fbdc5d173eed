"""The training loop's knobs: class weights, balanced sampling, determinism."""
import numpy as np
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.core.params import AugmentParams, TrainParams
from pipeline.models import build_model
from pipeline.training.loop import TrainConfig, epoch_order, resolve_class_weights, seed_everything, train
from tests.conftest import plain


def dark_and_bright(n_per_class: int = 24, size: int = 8):
    """Class 0: dark images, class 1: bright ones: trivially separable."""
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 60, (n_per_class, 3, size, size))
    bright = rng.integers(190, 256, (n_per_class, 3, size, size))
    x = np.concatenate([dark, bright]).astype(np.uint8)
    y = np.array([0] * n_per_class + [1] * n_per_class, dtype=np.int64)
    return x, y


def noise(n: int = 48, size: int = 8):
    """Labels that carry no information about the images: only the loss weights can steer."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 3, size, size)).astype(np.uint8), np.arange(n, dtype=np.int64) % 2


def fit(class_weights=None, sampler="shuffle", epochs=4, seed=0, data=None):
    x, y = data if data is not None else dark_and_bright()
    seed_everything(seed)
    model = build_model("original", num_classes=2, width=8)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.01, seed=seed, augment=AugmentParams(random_crop=False),
                      class_weights=class_weights, train=TrainParams(sampler=sampler, num_threads=1))
    result = train(model, (x, y), (x, y), plain(x), cfg, progress=False)
    return model, result, x


def test_balanced_weights_follow_the_definition():
    y = np.array([0] * 90 + [1] * 10)
    assert resolve_class_weights("balanced", y, ["a", "b"]) == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert resolve_class_weights("none", y, ["a", "b"]) is None
    assert resolve_class_weights([1.0, 3.0], y, ["a", "b"]) == [1.0, 3.0]
    with pytest.raises(UserError, match="2 classes"):
        resolve_class_weights([1.0, 2.0, 3.0], y, ["a", "b"])


def test_class_weights_reach_the_loss():
    # On labels that carry no signal, the weights alone decide: all weight on one class makes
    # the model predict that class for every image; no weights: a mix.
    from pipeline.checkpoint import predict_logits

    for weights, expected in (([0.0, 1.0], 1), ([1.0, 0.0], 0)):
        model, _, x = fit(class_weights=weights, data=noise(), epochs=2)
        pred = predict_logits(model, x, plain(x)).argmax(1)
        assert (pred == expected).all(), (weights, pred)
    _, result, _ = fit(class_weights=None)
    assert result.history["val_accuracy"].iloc[-1] == 1.0


def test_balanced_sampler_draws_classes_equally():
    y = np.array([0] * 900 + [1] * 100)
    gen = torch.Generator().manual_seed(0)
    order = epoch_order(y, "balanced", gen)
    assert len(order) == len(y)
    assert 0.45 < (y[order] == 1).mean() < 0.55
    plain = epoch_order(y, "shuffle", gen)
    assert sorted(plain) == list(range(len(y)))


def test_same_seed_same_result_on_cpu():
    _, a, _ = fit(epochs=2, seed=3)
    _, b, _ = fit(epochs=2, seed=3)
    assert a.history.drop(columns="images_per_second").equals(b.history.drop(columns="images_per_second"))
    for (k, va), vb in zip(a.best_state.items(), b.best_state.values()):
        assert torch.equal(va, vb), k
