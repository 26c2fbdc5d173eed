"""Multi-label numbers (pipeline.evaluation.multilabel, the sigmoid part of pipeline.calibration)
checked against scikit-learn computed directly, brute force, and hand-made examples. No torch."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    log_loss,
    precision_score,
    recall_score,
)

from pipeline.calibration import binary_nll, fit_sigmoid_temperature, sigmoid
from pipeline.evaluation import multilabel as ml

CLASSES = ["cat", "dog", "car", "tree", "sky"]


def synthetic(n: int = 400, seed: int = 0, decimals: int | None = None):
    """Seeded k-hot targets of 5 labels (prevalences 10 %–60 %) and logits that follow them
    noisily (label-dependent separation); probabilities rounded to `decimals` when asked."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 5)) < np.array([0.1, 0.25, 0.4, 0.5, 0.6])).astype(np.uint8)
    logits = (2.0 * y - 1.0) * np.array([0.5, 1.0, 1.5, 2.0, 3.0]) + rng.normal(0, 1.5, (n, 5))
    probs = expit(logits)
    if decimals is not None:
        probs = np.round(probs, decimals)
    return y, logits, probs


def test_sigmoid_is_stable_and_exact():
    z = np.array([-1000.0, -5.0, 0.0, 2.5, 1000.0], dtype=np.float32)
    s = sigmoid(z)
    assert s.dtype == np.float64 and np.isfinite(s).all()
    assert s[0] == 0.0 and s[-1] == 1.0 and s[2] == 0.5
    np.testing.assert_allclose(s[1:4], 1 / (1 + np.exp(-z[1:4].astype(np.float64))), rtol=1e-15)


def test_binary_nll_is_sklearn_log_loss_over_all_entries():
    y, logits, _ = synthetic(200)
    for t in (1.0, 2.0, 0.5):
        expected = log_loss(y.ravel(), expit(logits / t).ravel(), labels=[0, 1])
        assert binary_nll(logits, y, t) == pytest.approx(expected, rel=1e-10)
    # huge logits: exact from the logits, where probabilities would round to 0 or 1
    assert binary_nll(np.array([[1000.0, -1000.0]]), np.array([[0, 1]], np.uint8), 1.0) == pytest.approx(1000.0)
    assert binary_nll(np.array([[1000.0, -1000.0]]), np.array([[1, 0]], np.uint8), 1.0) == 0.0


def test_fit_sigmoid_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0, 2.0, (3000, 5))
    y = (rng.random(true_logit.shape) < expit(true_logit)).astype(np.uint8)
    logits = true_logit * 2.5  # an over-confident model: T = 2.5 undoes it
    t, note = fit_sigmoid_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.10)
    assert t == float(f"{t:.4g}")
    assert binary_nll(logits, y, t) < binary_nll(logits, y, 1.0) - 0.05
    assert "3,000 validation images" in note and "one for all 5 labels" in note
    t_sharp, _ = fit_sigmoid_temperature(true_logit / 2.0, y)  # under-confident: T < 1
    assert t_sharp == pytest.approx(0.5, rel=0.10)


def test_fit_sigmoid_temperature_without_mistakes_or_images():
    y = np.array([[1, 0], [0, 1]], np.uint8)
    t, note = fit_sigmoid_temperature(np.array([[3.0, -2.0], [0.0, 4.0]]), y)  # a 0 logit is no mistake
    assert (t, "no mistakes" in note) == (1.0, True)
    t, note = fit_sigmoid_temperature(np.zeros((0, 2)), np.zeros((0, 2), np.uint8))
    assert (t, "no validation images" in note) == (1.0, True)
    logits = np.array([[3.0, -2.0], [1.0, 4.0]])  # one mistake (image 1, label 0): fitted
    t, _ = fit_sigmoid_temperature(logits, y)
    assert t != 1.0 and binary_nll(logits, y, t) < binary_nll(logits, y, 1.0)


KEYS = ["map_macro", "map_micro", "f1_micro", "f1_macro", "precision_micro", "precision_macro", "recall_micro",
        "recall_macro", "subset_accuracy", "hamming_loss", "log_loss", "ece", "labels_per_image",
        "predicted_labels_per_image", "n_test"]


def test_multilabel_metrics_agree_with_sklearn():
    y, logits, probs = synthetic(400)
    thresholds = np.array([0.3, 0.45, 0.5, 0.55, 0.6])
    metrics, table = ml.multilabel_metrics(y, probs, thresholds, CLASSES)
    pred = (probs >= thresholds).astype(np.uint8)
    assert list(metrics) == KEYS
    assert all(type(v) is float for k, v in metrics.items() if k != "n_test") and type(metrics["n_test"]) is int
    aps = [average_precision_score(y[:, c], probs[:, c]) for c in range(5)]
    expected = {"map_macro": np.mean(aps), "map_micro": average_precision_score(y, probs, average="micro"),
                "subset_accuracy": accuracy_score(y, pred), "hamming_loss": hamming_loss(y, pred),
                "log_loss": log_loss(y.ravel(), probs.ravel(), labels=[0, 1]),
                "ece": np.mean(ml.ece_per_label(y, probs)), "labels_per_image": y.sum(1).mean(),
                "predicted_labels_per_image": pred.sum(1).mean(), "n_test": 400}
    for avg in ("micro", "macro"):
        expected |= {f"f1_{avg}": f1_score(y, pred, average=avg, zero_division=0),
                     f"precision_{avg}": precision_score(y, pred, average=avg, zero_division=0),
                     f"recall_{avg}": recall_score(y, pred, average=avg, zero_division=0)}
    for k in KEYS:
        assert metrics[k] == pytest.approx(expected[k], rel=1e-12, abs=1e-12), k
    assert 0.5 < metrics["map_macro"] < 1 and metrics["f1_micro"] != metrics["f1_macro"]
    assert metrics["log_loss"] == pytest.approx(binary_nll(logits, y, 1.0), abs=1e-6)

    assert list(table.columns) == ["label", "ap", "precision", "recall", "f1", "threshold", "support",
                                   "positive_rate", "ece"]
    assert table["label"].tolist() == CLASSES
    np.testing.assert_allclose(table["ap"], aps, rtol=1e-12)
    np.testing.assert_allclose(table["precision"], precision_score(y, pred, average=None, zero_division=0))
    np.testing.assert_allclose(table["recall"], recall_score(y, pred, average=None, zero_division=0))
    np.testing.assert_allclose(table["f1"], f1_score(y, pred, average=None, zero_division=0))
    np.testing.assert_array_equal(table["threshold"], thresholds)
    np.testing.assert_array_equal(table["support"], y.sum(0))
    np.testing.assert_allclose(table["positive_rate"], y.mean(0))
    np.testing.assert_allclose(table["ece"], ml.ece_per_label(y, probs))


def test_label_without_positives():
    y, _, probs = synthetic(300, seed=2)
    y[:, 2] = 0
    assert ml.choose_thresholds(y, probs)[2] == 0.5
    metrics, table = ml.multilabel_metrics(y, probs, np.full(5, 0.5), CLASSES)
    assert np.isnan(table.loc[2, "ap"]) and table.loc[2, "support"] == 0 and table.loc[2, "positive_rate"] == 0
    others = [average_precision_score(y[:, c], probs[:, c]) for c in (0, 1, 3, 4)]
    assert metrics["map_macro"] == pytest.approx(np.mean(others), rel=1e-12)
    pred = (probs >= 0.5).astype(np.uint8)
    assert metrics["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), rel=1e-12)


def brute_force_f1(y: np.ndarray, p: np.ndarray) -> float:
    """The best F1 of predicting "p ≥ s" over every distinct score s."""
    return max(f1_score(y, p >= s, zero_division=0) for s in np.unique(p))


def test_thresholds_maximise_f1_by_brute_force():
    y, _, probs = synthetic(60, seed=3, decimals=3)
    thresholds = ml.choose_thresholds(y, probs)
    assert thresholds.dtype == np.float64 and np.array_equal(thresholds, np.round(thresholds, 4))
    for c in range(5):
        best = brute_force_f1(y[:, c], probs[:, c])
        assert f1_score(y[:, c], probs[:, c] >= thresholds[c]) == pytest.approx(best, rel=1e-12), c
        # the midpoint rule: strictly between two distinct validation scores, never on one
        scores = np.unique(probs[:, c])
        assert thresholds[c] not in scores
        above, below = scores[scores > thresholds[c]].min(), np.append(0.0, scores[scores < thresholds[c]]).max()
        assert thresholds[c] == pytest.approx((above + below) / 2, abs=1e-4)
    # hand-made: positives at 0.9, 0.7 and 0.4, a negative at 0.6 and 0.2: F1 best at 0.7 (P 1, R 2/3:
    # 0.8) and at 0.4 (P 3/4, R 1: 0.857); the threshold sits between 0.4 and 0.2
    y1 = np.array([[1], [1], [0], [1], [0]], np.uint8)
    p1 = np.array([[0.9], [0.7], [0.6], [0.4], [0.2]])
    assert ml.choose_thresholds(y1, p1).tolist() == [0.3]


def test_precision_target_is_met_at_the_lowest_threshold():
    y, _, probs = synthetic(400, seed=4, decimals=3)
    for target in (0.8, 0.9):
        thresholds, by_f1 = ml.choose_thresholds(y, probs, target=target), ml.choose_thresholds(y, probs)
        reached = 0
        for c in range(5):
            p, yc = probs[:, c], y[:, c].astype(bool)
            scores = np.unique(p)
            said = p[None, :] >= scores[:, None]  # brute force: precision of "≥ s" at every score s
            precision = (said & yc).sum(1) / said.sum(1)
            if not (precision >= target).any():  # no score makes it: the F1 choice
                assert thresholds[c] == by_f1[c]
                continue
            reached += 1
            assert precision_score(yc, p >= thresholds[c]) >= target
            assert (precision[scores < thresholds[c]] < target).all()  # any lower threshold misses it
            assert (scores < thresholds[c]).any()
        assert reached >= 3
    # an unreachable precision (the top score is a negative): the F1 choice
    y1 = np.array([[0], [1], [1], [0], [1]], np.uint8)
    p1 = np.array([[0.95], [0.8], [0.7], [0.3], [0.1]])
    assert ml.choose_thresholds(y1, p1, target=1.0).tolist() == ml.choose_thresholds(y1, p1).tolist()
    # precision at ≥ 0.95, 0.8, 0.7, 0.3, 0.1: 0, 1/2, 2/3, 1/2, 3/5
    assert ml.choose_thresholds(y1, p1, target=0.65).tolist() == [0.5]   # ≥ 0.7, between 0.7 and 0.3
    assert ml.choose_thresholds(y1, p1, target=0.6).tolist() == [0.05]   # ≥ 0.1 (all): the lowest that makes it
    for bad in (0.0, 1.5, "precision", True):
        with pytest.raises(ValueError):
            ml.choose_thresholds(y1, p1, target=bad)


def test_ece_per_label_is_the_reliability_diagram_gap():
    y, _, probs = synthetic(500, seed=5)
    ece = ml.ece_per_label(y, probs, bins=10)
    for c in range(5):
        prob_true, prob_pred = calibration_curve(y[:, c], probs[:, c], n_bins=10, strategy="uniform")
        counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], probs[:, c]), minlength=10)
        weights = counts[counts > 0] / len(y)
        assert ece[c] == pytest.approx(np.sum(weights * np.abs(prob_true - prob_pred)), rel=1e-10)
    # by hand: a label right as often as it says (0 error); one that says 0.9 and is never true (0.9)
    y2 = np.array([[1, 0]] * 4 + [[0, 0]], np.uint8)
    p2 = np.full((5, 2), 0.8)
    p2[:, 1] = 0.9
    np.testing.assert_allclose(ml.ece_per_label(y2, p2), [0.0, 0.9], atol=1e-12)


def test_calibration_metrics():
    y, logits, _ = synthetic(300, seed=6)
    out = ml.calibration_metrics(y, logits, 1.7)
    assert list(out) == ["temperature", "log_loss_calibrated", "ece_calibrated"]
    assert out["temperature"] == 1.7
    assert out["log_loss_calibrated"] == pytest.approx(log_loss(y.ravel(), expit(logits / 1.7).ravel()), rel=1e-10)
    assert out["ece_calibrated"] == pytest.approx(ml.ece_per_label(y, expit(logits / 1.7)).mean(), rel=1e-12)


def test_error_cooccurrence_by_hand():
    #            labels: a  b  c
    y = np.array([[1, 0, 0],    # image 0: a missed, b said instead
                  [1, 1, 0],    # image 1: a and b missed, c said instead
                  [0, 0, 1]],   # image 2: c missed, nothing said instead
                 np.uint8)
    pred = np.array([[0, 1, 0],
                     [0, 0, 1],
                     [0, 0, 0]], np.uint8)
    expected = np.array([[0, 1, 1],
                         [0, 0, 1],
                         [0, 0, 1]])
    counts = ml.error_cooccurrence(y, pred)
    assert counts.dtype.kind == "i"
    np.testing.assert_array_equal(counts, expected)


def test_most_confident_errors_order():
    y = np.array([[0, 1], [0, 1], [0, 0], [1, 0]], np.uint8)
    probs = np.array([[0.7, 0.2],    # image 0: label 0 FP (0.7), label 1 FN (0.2)
                      [0.9, 0.45],   # image 1: label 0 FP (0.9), label 1 FN (0.45)
                      [0.7, 0.6],    # image 2: label 0 FP (0.7, tie with image 0), label 1 FP (0.6)
                      [0.8, 0.1]])   # image 3: right on both
    errors = ml.most_confident_errors(y, probs, np.array([0.5, 0.5]))
    assert list(errors.columns) == ["image", "label", "kind", "probability"]
    expected = [(1, 0, "false positive", 0.9), (0, 1, "false negative", 0.2),
                (0, 0, "false positive", 0.7), (1, 1, "false negative", 0.45),
                (2, 0, "false positive", 0.7), (2, 1, "false positive", 0.6)]
    assert list(errors.itertuples(index=False, name=None)) == expected
    limited = ml.most_confident_errors(y, probs, np.array([0.5, 0.5]), limit=3)
    assert list(limited.itertuples(index=False, name=None)) == expected[:3]
    none = ml.most_confident_errors(y, np.where(y == 1, 0.9, 0.1), np.array([0.5, 0.5]))
    assert len(none) == 0 and list(none.columns) == ["image", "label", "kind", "probability"]


def test_pr_curves_figure(tmp_path, monkeypatch):
    y, _, probs = synthetic(200, seed=7)
    thresholds = ml.choose_thresholds(y, probs)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    ml.pr_curves_figure(y, probs, thresholds, CLASSES, a)
    ml.pr_curves_figure(y, probs, thresholds, CLASSES, b)
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.stat().st_size > 10_000
    assert a.read_bytes() == b.read_bytes()  # reproducible

    import pipeline.plots

    seen = {}

    def capture(fig, path):
        seen["title"] = fig._suptitle.get_text()
        seen["panels"] = [ax.get_title() for ax in fig.axes if ax.axison]
        pipeline.plots.plt.close(fig)

    monkeypatch.setattr(pipeline.plots, "save", capture)
    rng = np.random.default_rng(8)
    y25 = (rng.random((100, 25)) < np.linspace(0.05, 0.5, 25)).astype(np.uint8)
    p25 = np.clip(y25 * 0.3 + rng.random((100, 25)) * 0.7, 0, 1)
    ml.pr_curves_figure(y25, p25, np.full(25, 0.5), [f"l{i}" for i in range(25)], tmp_path / "c.png")
    assert "20 labels with most positives of 25" in seen["title"]
    assert len(seen["panels"]) == 20
    most = np.argsort(-y25.sum(0), kind="stable")[:20]
    assert [t.split(" ")[0] for t in seen["panels"]] == [f"l{i}" for i in most]
    ap = average_precision_score(y25[:, most[0]], p25[:, most[0]])
    assert f"AP {ap:.3f}" in seen["panels"][0]
    ml.pr_curves_figure(y, probs, thresholds, CLASSES, tmp_path / "d.png")
    assert "most positives" not in seen["title"] and len(seen["panels"]) == 5
