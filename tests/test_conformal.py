"""Split conformal prediction sets (APS): the guarantee on exchangeable synthetic data over many
seeds, MAPIE's sets for the same probabilities, sets that shrink as the model gets better, and
abstention's risk-coverage figures."""
import math

import numpy as np
import pytest
from scipy.stats import binom

from pipeline.conformal import (
    aps_scores,
    confidence_for_accuracy,
    coverage_metrics,
    per_class_coverage,
    prediction_sets,
    risk_coverage,
    threshold,
)


def synthetic(rng: np.random.Generator, n: int, k: int = 10, sharpness: float = 2.0):
    """Labels drawn from the model's own (calibrated) probabilities: exchangeable by construction."""
    logits = rng.normal(size=(n, k)) * sharpness
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return p, y


def test_coverage_is_at_least_one_minus_alpha_over_many_seeds():
    alpha, n_cal, n_test, seeds = 0.1, 500, 500, 40
    covered = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        p_cal, y_cal = synthetic(rng, n_cal)
        p_test, y_test = synthetic(rng, n_test)
        sets = prediction_sets(p_test, threshold(aps_scores(p_cal, y_cal), alpha))
        covered.append(sets[np.arange(n_test), y_test].sum())
    total = sum(covered)
    # the mean coverage is ≥ 1 − α in expectation; over 20,000 test images it falls below only by chance:
    # the binomial's 0.1 % quantile at 1 − α bounds it
    assert total >= binom.ppf(0.001, seeds * n_test, 1 - alpha), total / (seeds * n_test)
    assert total / (seeds * n_test) < 1 - alpha + 0.015  # and not much more: the sets are not padded


def test_the_sets_are_mapies_aps_sets():
    pytest.importorskip("mapie")
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    rng = np.random.default_rng(0)
    p_cal, y_cal = synthetic(rng, 300, k=6)
    p_test, _ = synthetic(rng, 200, k=6)
    table = np.concatenate([p_cal, p_test])

    class Given(ClassifierMixin, BaseEstimator):  # the probabilities as they are, looked up by row number
        def fit(self, x, y):
            self.classes_ = np.arange(6)
            return self

        def predict_proba(self, x):
            return table[np.asarray(x)[:, 0].astype(int)]

        def predict(self, x):
            return self.predict_proba(x).argmax(axis=1)

    model = Given().fit(None, None)
    mapie = SplitConformalClassifier(model, confidence_level=0.9, conformity_score="aps", prefit=True, random_state=0)
    mapie.conformalize(np.arange(300)[:, None], y_cal)
    _, theirs = mapie.predict_set(np.arange(300, 500)[:, None], conformity_score_params={"include_last_label": True})
    u = np.random.RandomState(0).uniform(size=300)  # MAPIE's draws for randomized APS at random_state 0: its score
    ours = prediction_sets(p_test, threshold(aps_scores(p_cal, y_cal, 1 - u), 0.1), crossing=True)  # is mass − u·p
    assert np.array_equal(ours, theirs[:, :, 0]), (ours != theirs[:, :, 0]).sum()
    assert 1 < ours.sum(axis=1).mean() < 6


def test_sets_shrink_as_the_model_improves():
    rng = np.random.default_rng(1)
    sizes = []
    for sharpness in (0.5, 2.0, 6.0):
        p_cal, y_cal = synthetic(rng, 1000, sharpness=sharpness)
        p_test, y_test = synthetic(rng, 1000, sharpness=sharpness)
        sets = prediction_sets(p_test, threshold(aps_scores(p_cal, y_cal), 0.1))
        sizes.append(sets.sum(axis=1).mean())
    assert sizes[0] > sizes[1] > sizes[2] >= 1, sizes


def test_threshold_edges_and_metrics():
    assert threshold(np.array([0.2, 0.5, 0.9]), 0.1) == math.inf  # 3 images cannot promise 90 %
    assert threshold(np.linspace(0.01, 1, 100), 0.1) == pytest.approx(0.91)  # ⌈101 · 0.9⌉ = 91st
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert aps_scores(p, np.array([1, 2])).tolist() == pytest.approx([0.7, 0.75])
    sets = prediction_sets(p, 0.75)
    assert sets.tolist() == [[True, True, False], [True, True, True]]
    assert prediction_sets(p, 0.0).sum(axis=1).tolist() == [1, 1]  # never empty
    m = coverage_metrics(sets, np.array([1, 2]), 0.1, 0.8)
    assert m["coverage"] == 1.0 and m["set_size_mean"] == 2.5 and m["set_size_counts"] == {"2": 1, "3": 1}
    cov, size = per_class_coverage(sets, np.array([1, 2]), 3)
    assert np.isnan(cov[0]) and cov[1] == 1 and size[2] == 3


def test_abstention_keeps_the_confident_images():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 0, 1, 0])
    share, accuracy, conf = risk_coverage(p, y)
    assert share.tolist() == [0.25, 0.5, 0.75, 1.0] and accuracy.tolist() == [1.0, 1.0, 2 / 3, 0.75]
    assert confidence_for_accuracy(p, y, 0.95) == 0.8
    assert confidence_for_accuracy(p, y, 0.7) == 0.55
    assert confidence_for_accuracy(np.array([[0.9, 0.1]]), np.array([1]), 0.5) is None


@pytest.fixture(scope="module")
def digits_model(prepared_digits, tmp_path_factory):
    """A small CNN trained 2 epochs on digits at 16 px, saved as train saves it (temperature and
    the validation split's conformal scores); a few test images as PNG files."""
    from PIL import Image

    from pipeline.calibration import fit_temperature, scaled
    from pipeline.checkpoint import save_checkpoint
    from pipeline.conformal import calibration_scores
    from pipeline.models import build_model
    from pipeline.core.params import TrainParams
    from pipeline.prepared import load_preprocessing, load_split
    from pipeline.probabilities import softmax
    from pipeline.training.loop import TrainConfig, seed_everything, train

    folder = tmp_path_factory.mktemp("sets")
    prep = load_preprocessing(prepared_digits)
    seed_everything(0)
    model = build_model("original", num_classes=10, width=8)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, seed=0, train=TrainParams(num_threads=1))
    res = train(model, load_split("train", prepared_digits), load_split("val", prepared_digits), prep, cfg,
                progress=False)
    y_val = load_split("val", prepared_digits)[1]
    t, _ = fit_temperature(res.val_logits, y_val)
    save_checkpoint(folder / "model.pt", arch="original", arch_kwargs={"num_classes": 10, "width": 8},
                    state_dict=res.best_state, classes=[str(i) for i in range(10)], prep=prep, params={}, summary={},
                    temperature=t, conformal_scores=calibration_scores(softmax(scaled(res.val_logits, t)), y_val))
    x, _ = load_split("test", prepared_digits)
    images = folder / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(np.asarray(x[i]).transpose(1, 2, 0)).save(images / f"{i:02d}.png")
    return folder / "model.pt", images


def test_predict_gives_each_image_its_set_and_abstains_on_several(digits_model, capsys):
    import json

    from pipeline.export.predict import load_predictor, run

    path, images = digits_model
    loose = load_predictor(path, 0.3)
    tight = load_predictor(path, 0.02)
    assert loose.sets[0] == 0.3 and tight.sets[1] >= loose.sets[1]  # more coverage asked: a higher threshold
    assert run(path, [images], as_json=True, alpha=0.02, abstain=True) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 12 and all(line["alpha"] == 0.02 and line["top_k"][0]["label"] in line["set"] for line in lines)
    for line in lines:
        assert line["answer"] == ("unsure" if len(line["set"]) > 1 else line["top_k"][0]["label"])
    assert any(len(line["set"]) > 1 for line in lines), "2 epochs at α = 0.02: some images get several classes"
    assert load_predictor(path, 0).sets is None
    from pipeline.core.errors import UserError

    with pytest.raises(UserError, match="--alpha 1.5: give a level in"):
        load_predictor(path, 1.5)


def test_the_onnx_card_carries_the_threshold(digits_model, tmp_path):
    from pipeline.checkpoint import conformal_threshold, load_checkpoint
    from pipeline.export.onnx import model_card

    _, ckpt = load_checkpoint(digits_model[0])
    card = model_card(ckpt, 0.1)
    assert card["conformal_alpha"] == 0.1
    assert card["conformal_threshold"] == pytest.approx(min(conformal_threshold(ckpt, 0.1), 1.0), abs=1e-6)
    assert "conformal_threshold" not in model_card(ckpt, 0.0)
