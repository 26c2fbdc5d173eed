"""Better models from the same data: EMA of weights (kept, resumed exactly), temperature
scaling (fitted on validation, lowers ECE of an over-confident model), test-time augmentation
(views, and hflip on a flip-symmetric model equals plain), predict --tta."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.calibration import fit_temperature
from pipeline.checkpoint import Calibrated, calibrated
from pipeline.core.params import AugmentParams, TrainParams, parse_params
from pipeline.core.preprocess import Preprocessing, tta_views
from pipeline.evaluation.metrics import calibration_metrics, expected_calibration_error
from pipeline.evaluation.run import tta_logits, tta_probabilities
from pipeline.models import build_model
from pipeline.probabilities import softmax
from pipeline.training.ema import make_ema
from pipeline.training.loop import TrainConfig, seed_everything, train
from tests.conftest import plain
from tests.test_train import dark_and_bright


def cfg(ema: float = 0.0, epochs: int = 3, **kw) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=8, lr=0.01, seed=0, augment=AugmentParams(random_crop=False),
                       train=TrainParams(num_threads=1, ema_decay=ema), **kw)


def fit(c: TrainConfig, on_epoch=None):
    x, y = dark_and_bright()
    seed_everything(0)
    model = build_model("original", num_classes=2, width=8)
    return train(model, (x, y), (x, y), plain(x), c, on_epoch=on_epoch, progress=False)


# ---------------------------------------------------------------- EMA


def test_ema_decay_is_validated():
    with pytest.raises(Exception, match="ema_decay"):
        parse_params({"train": {"ema_decay": 1.0}}, check_models=False)


def test_ema_follows_the_warmed_up_average():
    """After n updates the average is lerped with weight 1 - min(decay, (1+n)/(10+n))."""
    model = nn.Linear(2, 1, bias=False)
    ema = make_ema(model, 0.99)
    expected = None
    for step, w in enumerate([1.0, 3.0, -2.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update_parameters(model)
        if step == 0:
            expected = w  # the first update copies
        else:
            decay = min(0.99, (1 + step) / (10 + step))
            expected = decay * expected + (1 - decay) * w
        assert float(ema.module.weight[0, 0].detach()) == pytest.approx(expected, rel=1e-6)
    assert make_ema(model, 0.0) is None


def test_ema_changes_the_kept_weights_and_what_is_validated():
    plain_run, ema_run = fit(cfg(0.0)), fit(cfg(0.9))
    assert any(not torch.equal(a, b) for a, b in zip(plain_run.best_state.values(), ema_run.best_state.values()))
    # the history's val figures are the average's: recomputing them from the kept state agrees
    x, y = dark_and_bright()
    model = build_model("original", num_classes=2, width=8)
    model.load_state_dict(ema_run.best_state)
    from pipeline.checkpoint import predict_logits

    logits = predict_logits(model, x, plain(x))
    np.testing.assert_allclose(logits, ema_run.val_logits, rtol=1e-5, atol=1e-5)
    best = ema_run.history.iloc[ema_run.best_epoch - 1]
    assert float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y))) == \
        pytest.approx(best["val_loss"], rel=1e-5)


def test_ema_resumes_exactly(tmp_path):
    """Interrupted after epoch 1 (a failure in the epoch-2 callback, before epoch 2's resume
    checkpoint), the re-run resumes the model, optimizer *and* the average, and ends bit for bit
    where an uninterrupted run ends."""
    reference = fit(cfg(0.9))
    resumable = cfg(0.9, resume_path=tmp_path / "last.pt", fingerprint="f")

    def die_at_2(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(resumable, on_epoch=die_at_2)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["ema"]["n_averaged"] > 0
    resumed = fit(resumable)
    assert resumed.best_epoch == reference.best_epoch
    for (k, a), b in zip(reference.best_state.items(), resumed.best_state.values()):
        assert torch.equal(a, b), k
    np.testing.assert_array_equal(reference.val_logits, resumed.val_logits)


# ---------------------------------------------------------------- calibration


def over_confident(n: int = 2000, k: int = 5, seed: int = 0):
    """Logits of a synthetic model right 70 % of the time but ~99 % sure: T should come out > 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), pred] += 8.0
    return logits.astype(np.float32), y


def test_temperature_scaling_lowers_ece_of_an_over_confident_model():
    val_logits, val_y = over_confident(seed=0)
    test_logits, test_y = over_confident(seed=1)
    t, note = fit_temperature(val_logits, val_y)
    assert t > 2 and "fitted on 2,000 validation images" in note
    m = calibration_metrics(test_y, test_logits, t)
    before = expected_calibration_error(softmax(test_logits), test_y)
    assert m["ece_calibrated"] < before / 3 and m["temperature"] == t
    # accuracy does not change: the argmax of logits / T is the argmax of the logits
    assert (softmax(test_logits / t).argmax(1) == test_logits.argmax(1)).all()


def test_no_mistakes_on_validation_means_no_temperature():
    logits, y = over_confident()
    right = logits.argmax(1)
    assert fit_temperature(logits, right) == (1.0, "no mistakes on the validation split to calibrate against: T = 1")


def test_calibrated_model_divides_by_t():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    wrapped = calibrated(model, {"temperature": 2.5})
    assert isinstance(wrapped, Calibrated)
    torch.testing.assert_close(wrapped(x), model(x) / 2.5)
    assert calibrated(model, {"temperature": None}) is model and calibrated(model, {}) is model


# ---------------------------------------------------------------- TTA


class FlipSymmetric(nn.Module):
    """A classifier that sees an image and its mirror alike: its convolution kernels are
    left-right symmetric and it pools globally."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_views():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 20, 20), dtype=np.uint8)
    assert [len(tta_views(x, 16, m)) for m in ("none", "hflip", "hflip_crops")] == [1, 2, 10]
    views = tta_views(x, 16, "hflip_crops")
    np.testing.assert_array_equal(views[0], x[..., 2:18, 2:18])       # the centre crop first
    np.testing.assert_array_equal(views[1], x[..., 2:18, 2:18][..., ::-1])  # then its mirror
    np.testing.assert_array_equal(views[2], x[..., :16, :16])         # a corner
    for a, b in zip(views, tta_views(torch.from_numpy(x), 16, "hflip_crops")):  # tensors: the same pixels
        np.testing.assert_array_equal(a, b.numpy())
    same = tta_views(x[..., :16, :16], 16, "hflip_crops")  # stored at the input size: shifted by 1 px
    np.testing.assert_array_equal(same[2][..., 1:, 1:], x[..., :15, :15])


def test_hflip_tta_of_a_flip_symmetric_model_equals_plain():
    torch.manual_seed(0)
    model = FlipSymmetric().eval()
    x = np.random.default_rng(1).integers(0, 256, (12, 3, 16, 16), dtype=np.uint8)
    prep = plain(x)
    views = tta_logits(model, x, prep, "hflip")
    np.testing.assert_allclose(views[0], views[1], atol=1e-5)
    np.testing.assert_allclose(tta_probabilities(views), softmax(views[0]), atol=1e-6)


def test_tta_reuses_the_plain_logits_as_its_centre_view():
    """Evaluate passes its plain logits as the first view instead of running it again: that is
    valid only if the first view's logits are the plain pass's, bit for bit (stored 20 px, input 16)."""
    from pipeline.checkpoint import predict_logits

    torch.manual_seed(0)
    model = FlipSymmetric().eval()
    x = np.random.default_rng(2).integers(0, 256, (9, 3, 20, 20), dtype=np.uint8)
    prep = Preprocessing(16, 20, mean=(0.5,) * 3, std=(0.25,) * 3)
    plain_logits = predict_logits(model, x, prep)
    fresh = tta_logits(model, x, prep, "hflip_crops")
    reused = tta_logits(model, x, prep, "hflip_crops", centre=plain_logits)
    assert len(fresh) == len(reused) == 10 and reused[0] is plain_logits
    for a, b in zip(fresh, reused):
        np.testing.assert_array_equal(a, b)


def test_predict_tta_averages_the_views(tmp_path):
    from PIL import Image

    from pipeline.checkpoint import save_checkpoint
    from pipeline.export.predict import load_predictor, predict_files

    torch.manual_seed(0)
    model = build_model("original", num_classes=3, width=8)
    prep = replace(plain(np.zeros((1, 3, 16, 16))), stored_size=20)
    save_checkpoint(tmp_path / "m.pt", arch="original", arch_kwargs={"num_classes": 3, "width": 8},
                    state_dict=model.state_dict(), classes=["a", "b", "c"], prep=prep, params={}, summary={},
                    temperature=2.0)
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(img)
    predictor = load_predictor(tmp_path / "m.pt")
    (_, plain_top, _), = predict_files(predictor, [img], 3)
    (_, tta_top, _), = predict_files(predictor, [img], 3, tta="hflip_crops")
    stored = np.asarray(Image.open(img).convert("RGB")).transpose(2, 0, 1)[None]
    views = [predict_logits_of(model, v, prep) / 2.0 for v in tta_views(stored, 16, "hflip_crops")]
    expected = np.mean([softmax(v) for v in views], axis=0)[0]
    assert dict(tta_top) == pytest.approx({c: float(p) for c, p in zip("abc", expected)}, abs=1e-6)
    assert dict(plain_top) == pytest.approx({c: float(p) for c, p in zip("abc", softmax(views[0])[0])}, abs=1e-6)


def predict_logits_of(model, x, prep):
    from pipeline.checkpoint import predict_logits

    return predict_logits(model, x, prep)


# ---------------------------------------------------------------- through the evaluate stage


@pytest.fixture
def evaluated_again(exported_pipeline, tmp_path):
    """A copy of the exported tiny pipeline's working folder, to re-run evaluate with other params."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(exported_pipeline[0], work)
    return work, f"sqlite:///{work / 'store.db'}"  # its own copy of the store: the report stage logs a run


def run_evaluate(work, uri, **updates):
    """evaluate with `updates`, then the report stage (which writes the report); evaluate's metrics."""
    from stages import evaluate, report
    from tests.conftest import set_params

    set_params(work, **updates)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        metrics = evaluate.main()
        report.main()
        return metrics


@pytest.mark.slow
def test_tta_and_switches_through_the_stage(evaluated_again):
    from PIL import Image

    from pipeline.core import paths
    from pipeline.core.io import read_json

    work, uri = evaluated_again
    before = read_json(work / paths.EVAL_METRICS)
    pngs = {p: (work / p).read_bytes() for p in (paths.ACTIVATIONS_PNG, paths.FILTERS_PNG, paths.EMBEDDING_PNG)}
    metrics = run_evaluate(work, uri, **{"evaluate.tta": "hflip_crops", "evaluate.activations": False,
                                         "evaluate.filters": False, "evaluate.embedding": False,
                                         "evaluate.label_issues": False, "plots.smoothing": 0.6})
    # the plain figures are kept as they were; the TTA ones are added beside them
    assert {k: metrics[k] for k in before} == before
    assert metrics["tta_views"] == 10 and {"accuracy_tta", "log_loss_tta", "ece_tta"} <= set(metrics)
    assert 0.5 < metrics["accuracy_tta"] <= 1.0
    report = (work / paths.EVAL_REPORT_MD).read_text()
    assert "accuracy with test-time augmentation" in report
    # switched off: each picture is a small note saying how to switch it on, listed in the report
    for p in pngs:
        assert (work / p).read_bytes() != pngs[p]
        assert Image.open(work / p).size[0] < 600
    assert "evaluate.activations: false" in report and "evaluate.label_issues: false" in report
    assert (work / paths.LABEL_ISSUES).read_text().startswith("rank,split,index,given")


def test_smoothing_is_tensorboards():
    from pipeline.plots import smooth

    assert list(smooth([1.0, 2.0, 3.0], 0.0)) == [1.0, 2.0, 3.0]
    s = smooth([1.0, 3.0], 0.6)
    assert s[0] == pytest.approx(1.0)  # debiased: the first point is itself, not 0.4
    assert s[1] == pytest.approx((0.6 * 0.4 * 1.0 + 0.4 * 3.0) / (1 - 0.36))


def test_reliability_and_smoothed_curves_are_pngs_of_a_sensible_size(tmp_path):
    import pandas as pd
    from PIL import Image

    from pipeline.evaluation.figures import (
        RELIABILITY_SIZE,
        reliability_bins,
        reliability_diagram,
    )
    from pipeline.plots import DPI, learning_curves

    logits, y = over_confident(500)
    t, _ = fit_temperature(logits, y)
    panels = [("before", softmax(logits), 0.2), ("after", softmax(logits / t), 0.02)]
    reliability_diagram(y, panels, tmp_path / "r.png", 15)
    w, h = Image.open(tmp_path / "r.png").size
    assert 0.8 * RELIABILITY_SIZE[0] * DPI < w <= 1.05 * RELIABILITY_SIZE[0] * DPI
    assert 0.8 * RELIABILITY_SIZE[1] * DPI < h <= 1.05 * RELIABILITY_SIZE[1] * DPI
    acc, conf, count = reliability_bins(softmax(logits), y, 15)
    assert count.sum() == 500 and np.nanmax(conf) > 0.9 and np.nanmin(acc[count > 20]) < 0.9  # over-confident
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.7], "val_loss": [1.1, 0.6, 0.9],
                            "train_accuracy": [0.5, 0.7, 0.6], "val_accuracy": [0.4, 0.6, 0.5]})
    for smoothing in (0.0, 0.6):
        learning_curves(history, 2, tmp_path / f"c{smoothing}.png", smoothing)
        w, h = Image.open(tmp_path / f"c{smoothing}.png").size
        assert 800 < w < 1100 and 300 < h < 450
    assert (tmp_path / "c0.0.png").read_bytes() != (tmp_path / "c0.6.png").read_bytes()
