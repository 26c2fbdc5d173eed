"""Recipe parts: optimizers, schedules with warmup, mixup/cutmix, early stopping, grad clipping."""
import numpy as np
import pytest
import torch

from pipeline.core.params import AugmentParams, TrainParams
from pipeline.models import build_model
from pipeline.training.loop import TrainConfig, seed_everything, train
from pipeline.training.recipe import EarlyStopping, make_mixer, make_optimizer, make_scheduler, param_groups
from tests.conftest import plain


def lrs(recipe: TrainParams, epochs=4, steps=10, lr=0.1) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(param_groups(model, recipe.weight_decay, lr), recipe, lr)
    sched = make_scheduler(opt, recipe, epochs, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizers_and_no_decay_on_norms_and_biases(name, cls):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    groups = param_groups(model, 0.05, 0.1)
    opt = make_optimizer(groups, TrainParams(optimizer=name), 0.1)
    assert isinstance(opt, cls)
    assert [p.ndim for p in opt.param_groups[0]["params"]] == [4] and opt.param_groups[0]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in opt.param_groups[1]["params"]) and opt.param_groups[1]["weight_decay"] == 0


def test_schedules():
    cos = lrs(TrainParams(scheduler="cosine", warmup_epochs=1))
    assert cos[0] == pytest.approx(0.001) and cos[10] == pytest.approx(0.1)  # warmup from lr/100 to lr
    assert all(a < b for a, b in zip(cos[:10], cos[1:11]))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:])) and cos[-1] < 0.002
    step = lrs(TrainParams(scheduler="step", step_epochs=2, step_gamma=0.5))
    assert step[0] == step[19] == pytest.approx(0.1) and step[20] == pytest.approx(0.05)
    assert set(lrs(TrainParams(scheduler="none"))) == {0.1}
    one = lrs(TrainParams(scheduler="onecycle"))
    assert max(one) == pytest.approx(0.1, rel=0.01) and one[0] < 0.01 and one[-1] < 0.001


def test_mixup_and_cutmix_give_soft_targets():
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    for recipe in (TrainParams(mixup_alpha=0.4), TrainParams(cutmix_alpha=1.0), TrainParams(mixup_alpha=0.2, cutmix_alpha=1.0)):
        mixed, target = make_mixer(recipe, 4)(x, y)
        assert mixed.shape == x.shape and target.shape == (8, 4)
        assert torch.allclose(target.sum(1), torch.ones(8))
    assert make_mixer(TrainParams(), 4) is None


def test_early_stopping_logic():
    stop = EarlyStopping("val_loss", patience=2, min_delta=0.01)
    assert stop.step(1.0) and stop.step(0.9)
    assert not stop.step(0.895)  # better, but by less than min_delta
    assert not stop.should_stop and not stop.step(0.95) and stop.should_stop


def test_accuracy_ties_go_to_the_lower_validation_loss():
    stop = EarlyStopping("val_accuracy", patience=2, min_delta=0)
    assert stop.step(0.98, 0.10)
    assert stop.step(0.98, 0.05)       # same accuracy, lower loss: the better epoch to keep
    assert not stop.step(0.98, 0.07)   # same accuracy, higher loss
    assert stop.should_stop            # ties are not improvements: patience ran out
    assert stop.step(0.99, 0.20)       # higher accuracy wins whatever the loss


def test_training_stops_early_and_keeps_the_best_epoch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 3, 8, 8)).astype(np.uint8)
    y = np.arange(32) % 2  # noise labels: validation cannot improve for long
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    cfg = TrainConfig(epochs=30, batch_size=8, lr=0.01, seed=0, augment=AugmentParams(random_crop=False),
                      train=TrainParams(patience=2, monitor="val_loss", num_threads=1))
    result = train(model, (x, y), (x[:16], y[:16] ^ 1), plain(x), cfg, progress=False)
    assert result.metrics["stopped_early"] and result.metrics["epochs_run"] < 30
    assert result.metrics["epochs_run"] == result.best_epoch + 2
    assert result.history["val_loss"].min() == pytest.approx(result.history["val_loss"].iloc[result.best_epoch - 1])


def test_grad_clip_bounds_the_update():
    seed_everything(0)
    x = np.full((16, 3, 8, 8), 255, np.uint8)
    y = np.arange(16) % 2
    deltas = {}
    for clip in (0.0, 1e-3):
        seed_everything(0)
        model = build_model("original", num_classes=2, width=8)
        before = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(epochs=1, batch_size=16, lr=1.0, seed=0, augment=AugmentParams(random_crop=False),
                          train=TrainParams(optimizer="sgd", momentum=0.0, weight_decay=0.0, scheduler="none",
                                       grad_clip=clip, num_threads=1))
        train(model, (x, y), (x[:2], y[:2]), plain(x), cfg, progress=False)
        deltas[clip] = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert deltas[1e-3] <= 1e-3 * 1.0001 < deltas[0.0]


def test_lr_suggestion_is_the_steepest_fall_past_the_noisy_start():
    from pipeline.training.lr import suggest

    lrs = np.logspace(-6, 0, 100)
    losses = 0.8 - 0.5 / (1 + np.exp(-(np.log10(lrs) + 2.5) * 2))  # falls fastest at 10^-2.5
    losses[:8] += np.array([0.05, -0.04, 0.03, -0.03, 0.02, -0.02, 0.01, -0.01])  # the first steps' noise
    losses[-10:] += np.linspace(0, 2, 10)  # divergence past the minimum
    assert 10 ** -2.8 < suggest(lrs, losses) < 10 ** -2.2
