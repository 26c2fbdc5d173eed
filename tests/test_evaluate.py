"""Evaluation: metrics against hand-computed cases, the misclassified grid as real PNGs of the
expected size, Grad-CAM finding the one informative region of a synthetic data set, the Markdown
report, and evaluate's outputs declared in dvc.yaml. (The other pictures: tests/test_figures.py;
the stage end to end: tests/test_stages.py.)"""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import plots

from pipeline.core import paths
from pipeline.evaluation import figures
from pipeline.evaluation.gradcam import grad_cam, gradcam_figure, split_model
from pipeline.evaluation.metrics import (
    evaluation_metrics,
    expected_calibration_error,
    most_confident_mistakes,
    normalize_rows,
)
from pipeline.core.params import AugmentParams
from pipeline.core.preprocess import Preprocessing, normalize
from pipeline.evaluation.report import evaluation_report
from pipeline.models import build_model
from pipeline.training.loop import TrainConfig, train
from tests.conftest import ROOT

ALL_KEYS = {"accuracy", "balanced_accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro",
            "precision_weighted", "recall_weighted", "f1_weighted", "log_loss", "ece", "n_test"}


# --- metrics by hand --------------------------------------------------------------------------

def test_metrics_by_hand_with_a_class_never_predicted():
    # supports 3, 2, 1 (so weighted ≠ macro); class 2 is never predicted
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1],    # 0 → 0
                      [0.6, 0.3, 0.1],    # 0 → 0
                      [0.3, 0.6, 0.1],    # 0 → 1
                      [0.2, 0.7, 0.1],    # 1 → 1
                      [0.5, 0.4, 0.1],    # 1 → 0
                      [0.1, 0.5, 0.4]])   # 2 → 1
    m, per_class, cm = evaluation_metrics(y, probs, ["a", "b", "c"])
    assert set(m) == ALL_KEYS - {"top5_accuracy"}  # 3 classes: no top-5
    p, r = [2 / 3, 1 / 3, 0], [2 / 3, 1 / 2, 0]
    f = [2 / 3, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 0]
    support = [3, 2, 1]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["precision_macro"] == pytest.approx(sum(p) / 3)
    assert m["f1_macro"] == pytest.approx(sum(f) / 3)
    assert m["precision_weighted"] == pytest.approx(np.dot(p, support) / 6)
    assert m["recall_weighted"] == pytest.approx(np.dot(r, support) / 6)
    assert m["f1_weighted"] == pytest.approx(np.dot(f, support) / 6)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.6, 0.3, 0.7, 0.4, 0.4])))
    assert m["n_test"] == 6
    assert per_class["precision"].tolist() == pytest.approx(p) and per_class["support"].tolist() == support
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert normalize_rows(cm).sum(axis=1).tolist() == pytest.approx([1, 1, 1])


def test_log_loss_counts_classes_absent_from_the_test_set():
    # 4 classes, class 3 never occurs in y: the loss is still over all four columns
    y = np.array([0, 1, 2])
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    m, _, _ = evaluation_metrics(y, probs, list("abcd"))
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.5, 0.25])))


def test_top5_accuracy_with_seven_classes():
    # the true class (0) ranks 1st, 5th, 6th and 7th among 7 scores
    ranks = [1, 5, 6, 7]
    logits = np.zeros((4, 7))
    for i, rank in enumerate(ranks):
        order = [c for c in range(1, 7)]
        order.insert(rank - 1, 0)  # order[j] is the class with the (j+1)-th highest score
        logits[i, order] = np.arange(7, 0, -1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m, _, _ = evaluation_metrics(np.zeros(4, dtype=int), probs, list("abcdefg"))
    assert set(m) == ALL_KEYS
    assert m["top5_accuracy"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(1 / 4)


def test_ece_by_hand():
    # confidences 0.90 (right), 0.92 (wrong): both in bin (13/15, 14/15]; 0.70 (right) in
    # (10/15, 11/15]; 0.55 (wrong) in (8/15, 9/15]
    probs = np.array([[0.90, 0.10], [0.08, 0.92], [0.70, 0.30], [0.45, 0.55]])
    y = np.array([0, 0, 0, 0])
    expected = 2 / 4 * abs(0.5 - 0.91) + 1 / 4 * abs(1 - 0.70) + 1 / 4 * abs(0 - 0.55)
    assert expected_calibration_error(probs, y) == pytest.approx(expected)  # 0.4175
    # with 10 bins, 0.90 and 0.92 fall apart: the number of bins matters
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx((0.10 + 0.92 + 0.30 + 0.55) / 4)
    # perfectly calibrated: 75 % confident and right 3 times in 4
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert evaluation_metrics(y, probs, ["a", "b"])[0]["ece"] == pytest.approx(expected)


def test_most_confident_mistakes_first_and_capped():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.1, 0.9], [0.4, 0.6], [0.8, 0.2]])
    y = np.array([0, 0, 0, 0, 1])  # wrong: 1 (0.7), 2 (0.9), 3 (0.6), 4 (0.8)
    assert most_confident_mistakes(y, probs).tolist() == [2, 4, 1, 3]
    assert most_confident_mistakes(y, probs, limit=2).tolist() == [2, 4]
    assert most_confident_mistakes(np.array([0, 1, 1, 1, 0]), probs).tolist() == []


# --- pictures: real PNGs of the size the figure asks for ---------------------------------------

def assert_png_size(path: Path, width_in: float, height_in: float) -> None:
    """A PNG whose size is the figure size × DPI, give or take what bbox_inches='tight'
    trims or adds (margins, tick labels)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert img.convert("L").getextrema()[0] < 128  # something dark is drawn: not blank
    assert 0.7 * width_in * plots.DPI <= w <= 1.1 * width_in * plots.DPI, (w, width_in)
    assert 0.7 * height_in * plots.DPI <= h <= 1.1 * height_in * plots.DPI, (h, height_in)


@pytest.mark.parametrize("n, rows", [(7, 2), (24, 4)])
def test_misclassified_grid_png(tmp_path, n, rows):
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    figures.misclassified_grid(images, ["3 → 8 (0.97)"] * n, tmp_path / "m.png", n_test=100)
    assert_png_size(tmp_path / "m.png", 6 * plots.CELL[0], rows * plots.CELL[1] + plots.heading_inches("two\nlines"))


def test_misclassified_png_says_so_when_there_are_none(tmp_path):
    figures.misclassified_grid(np.zeros((0, 3, 16, 16), np.uint8), [], tmp_path / "m.png", n_test=100)
    assert_png_size(tmp_path / "m.png", *plots.NOTE_SIZE)


# --- Grad-CAM ---------------------------------------------------------------------------------

QUADRANTS = {"top-left": (slice(0, 16), slice(0, 16)), "bottom-right": (slice(16, 32), slice(16, 32))}
MEAN, STD = [0.5] * 3, [0.25] * 3
PREP = Preprocessing(32, 32, mean=tuple(MEAN), std=tuple(STD))


def quadrant_data(n: int, seed: int, where: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """32×32 uniform noise; the class is only in one quadrant: horizontal (0) or vertical (1) stripes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 2, size=n)
    stripes = (np.arange(16) // 2 % 2 * 255).astype(np.uint8)
    for i in range(n):
        x[i, :, where[0], where[1]] = stripes[:, None] if y[i] == 0 else stripes[None, :]
    return x, y


@pytest.mark.parametrize("quadrant", QUADRANTS)
def test_gradcam_highlights_the_only_informative_quadrant(quadrant):
    where = QUADRANTS[quadrant]
    torch.manual_seed(0)
    model = build_model("original", 2, width=16)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.003, seed=0, augment=AugmentParams(random_crop=False))
    result = train(model, quadrant_data(512, 0, where), quadrant_data(64, 1, where), PREP, cfg, progress=False)
    model.load_state_dict(result.best_state)
    x, y = quadrant_data(64, 2, where)
    heat, logits = grad_cam(model, normalize(torch.from_numpy(x), MEAN, STD))
    assert (logits.argmax(1).numpy() == y).mean() > 0.9  # it learned the pattern
    assert heat.shape == (64, 32, 32) and float(heat.min()) >= 0 and float(heat.max()) <= 1
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[where] = True
    heat_in, heat_out = heat[:, inside].mean(1), heat[:, ~inside].mean(1)
    assert heat_in.mean() > 2 * heat_out.mean(), (heat_in.mean(), heat_out.mean())
    assert (heat_in > heat_out).float().mean() > 0.9  # nearly every single image, not just on average


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_gradcam_runs_on_other_cnn_families(name):
    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    assert split_model(model, 64) is not None
    x = torch.randn(2, 3, 64, 64)
    heat, logits = grad_cam(model, x)
    assert heat.shape == (2, 64, 64) and logits.shape == (2, 3)
    assert torch.isfinite(heat).all() and float(heat.min()) >= 0 and float(heat.max()) <= 1
    assert not any(p.grad is not None for p in model.parameters())  # weights' .grad untouched


def test_gradcam_is_skipped_with_a_note_for_a_vision_transformer(tmp_path):
    model = build_model("vit_tiny_patch16_224", 2, img_size=32, patch_size=8, depth=1).eval()
    assert split_model(model, 32) is None
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    y = np.array([0, 1, 0, 1])
    note = gradcam_figure(model, images, y, np.eye(2)[y], ["a", "b"], PREP, tmp_path / "g.png")
    assert note and "skipped" in note
    assert_png_size(tmp_path / "g.png", *plots.NOTE_SIZE)
    with pytest.raises(ValueError, match="no spatial feature map"):
        grad_cam(model, torch.zeros(1, 3, 32, 32))


# --- the report and dvc.yaml ------------------------------------------------------------------

def test_report_links_only_pictures_that_exist(tmp_path):
    import pandas as pd

    (tmp_path / "confusion_matrix.png").write_bytes(b"png")
    ckpt = {"arch": "resnet18", "classes": ["cat", "dog"], "preprocessing": {"image_size": 32},
            "params": {"dataset": "folder", "model": "resnet18", "lr": 0.003, "train": {"optimizer": "sgd"}}}
    metrics = {"accuracy": 0.875, "log_loss": 0.31234, "ece": 0.05, "n_test": 8}
    per_class = pd.DataFrame({"class": ["cat", "dog"], "precision": [0.8, 1.0], "recall": [1.0, 0.75],
                              "f1": [0.889, 0.857], "support": [4, 4]})
    text = evaluation_report(ckpt=ckpt, run={"run_id": "abc123", "experiment": "exp"}, train_summary=None,
                             metrics=metrics, per_class=per_class, report_path=tmp_path / "report.md",
                             pictures=[("Confusion matrix", tmp_path / "confusion_matrix.png"),
                                       ("Grad-CAM", tmp_path / "gradcam.png")])
    assert "![Confusion matrix](confusion_matrix.png)" in text and "gradcam.png" not in text
    assert "`abc123`" in text and "| train.optimizer | `sgd` |" in text and "| lr | 0.003 |" in text
    assert "| log loss (lower is better) | 0.3123 |" in text
    assert "| dog | 1.000 | 0.750 | 0.857 | 4 |" in text
    assert "No metrics/train.json" in text


def test_evaluate_outputs_are_declared_in_dvc_yaml():
    from stages.evaluate import OUTPUTS

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    declared = {next(iter(e)) if isinstance(e, dict) else e
                for section in ("outs", "metrics", "plots") for e in stage.get(section, [])}
    assert declared == {str(p) for p in OUTPUTS}
    assert "pipeline/evaluation" in stage["deps"]  # gradcam, report, metrics: the whole package
    assert str(paths.EVAL_REPORT_MD) == "metrics/report.md"
