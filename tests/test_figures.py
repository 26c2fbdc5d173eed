"""The pictures a person reads: the confusion matrix at 3, 10 and 100 classes (size, blank empty
cells, visible errors, numbers only where they fit), Grad-CAM (mistakes included, one caption,
a colour bar), the misclassified grid as narrow as its images, augmented samples beside their
originals. Real matplotlib (Agg), real small models, PNGs read back with PIL."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import plots
from pipeline.checkpoint import predict_logits
from pipeline.core.params import AugmentParams
from pipeline.core.preprocess import Preprocessing
from pipeline.evaluation import figures
from pipeline.evaluation.gradcam import gradcam_figure
from pipeline.evaluation.metrics import gradcam_sample, softmax
from pipeline.models import build_model
from pipeline.training.loop import TrainConfig
from pipeline.training.run import Setup, augmented_samples

PREP = Preprocessing(16, 20, mean=(0.5,) * 3, std=(0.25,) * 3)  # stored at 20 px, centre crop 16


def noisy_cm(k: int, per_class: int = 50, seed: int = 0) -> np.ndarray:
    """Counts of a classifier right about 90 % of the time, errors spread at random."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), per_class)
    pred = np.where(rng.random(len(y)) < 0.9, y, rng.integers(0, k, len(y)))
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    return cm


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.convert("L").getextrema()[0] < 128  # something dark drawn
        return img.size


# --- confusion matrix ---------------------------------------------------------------------------

@pytest.mark.parametrize("k, low, high", [(3, 300, 800), (10, 600, 1100), (100, 1200, 2000)])
def test_confusion_png_has_a_sensible_size(tmp_path, k, low, high):
    classes = [f"class {i}" for i in range(k)]
    figures.confusion_matrix(noisy_cm(k), classes, tmp_path / "cm.png")
    w, h = png_size(tmp_path / "cm.png")
    assert low <= w <= high and low <= h <= high, (w, h)
    figures.confusion_matrix(noisy_cm(k), classes, tmp_path / "again.png")  # the same bytes for the same inputs
    assert (tmp_path / "cm.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_numbers_only_where_they_fit():
    assert figures.cell_text(0, 0.0, 40, 10) == ""  # empty cells say nothing
    ten, thirty, hundred = (figures.cm_layout([str(i) for i in range(k)]) for k in (10, 30, 100))
    assert figures.cell_text(46, 0.92, ten.cell_pt, ten.text_pt) == "46\n92%"  # count and share of the row
    assert figures.cell_text(1, 0.004, ten.cell_pt, ten.text_pt) == "1\n<1%"
    assert figures.cell_text(46, 0.92, thirty.cell_pt, thirty.text_pt) == "46"  # one line fits
    assert figures.cell_text(46, 0.92, hundred.cell_pt, hundred.text_pt) == ""  # too small for any
    assert hundred.label_pt >= 6 and hundred.side <= figures.CM_MAX_SIDE  # names stay readable, size bounded


def cell_rgb(fig, ax, i: int, j: int) -> np.ndarray:
    """The rendered colour at the centre of cell (row i, column j)."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    x, y = ax.transData.transform((j, i))
    return pixels[pixels.shape[0] - round(y), round(x)]


def test_empty_cells_are_blank_and_a_single_error_shows():
    # class 0: 999 right, 1 taken for class 1 (0.1 %); nobody is taken for class 2 from class 0
    cm = np.array([[999, 1, 0], [5, 40, 5], [0, 3, 47]])
    fig = figures.confusion_figure(cm, ["cat", "dog", "bird"])
    ax = fig.axes[0]
    white = np.array([255, 255, 255])
    assert (cell_rgb(fig, ax, 0, 2) == white).all() and (cell_rgb(fig, ax, 2, 0) == white).all()
    assert [t.get_text() for t in ax.texts if t.get_position() == (2, 0)] == []  # no "0" printed
    one_error = cell_rgb(fig, ax, 0, 1).astype(int)
    assert one_error.sum() < 3 * 235 and one_error[0] > one_error[2] + 40  # visibly red, not near-white
    right = cell_rgb(fig, ax, 0, 0).astype(int)
    assert right[2] > right[0] + 40  # the diagonal is blue
    assert len(fig.axes) == 3  # the matrix and two colour bars (correct, errors)
    plots.plt.close(fig)


# --- Grad-CAM -----------------------------------------------------------------------------------

def test_gradcam_sample_has_correct_ones_per_class_then_the_most_confident_mistakes():
    y = np.repeat(np.arange(3), 6)
    probs = np.full((18, 3), 0.1)
    probs[np.arange(18), y] = np.linspace(0.5, 0.8, 18)  # all right, more confident further on
    wrong = {1: 2, 8: 0, 13: 1}  # index: predicted class
    for i, p in wrong.items():
        probs[i] = 0.05
        probs[i, p] = 0.9 if i == 8 else 0.6
    idx, mistakes = gradcam_sample(y, probs, limit=9)
    assert idx[mistakes].tolist() == [8, 1, 13]  # every mistake (≤ a third), most confident first
    right = idx[~mistakes]
    assert len(right) == 6 and y[right].tolist() == [0, 0, 1, 1, 2, 2]  # grouped, each class its turn
    assert right.tolist() == [5, 4, 11, 10, 17, 16]  # most confident correct first within a class
    all_right = np.eye(3)[y] * 0.8 + 0.1
    idx, mistakes = gradcam_sample(y, all_right, limit=9)
    assert not mistakes.any() and len(idx) == 9


def test_gradcam_figure_shows_mistakes_with_one_caption_and_a_colour_bar(tmp_path):
    torch.manual_seed(0)
    model = build_model("original", 3, width=8).eval()  # untrained: it makes mistakes
    rng = np.random.default_rng(0)
    images, y = rng.integers(0, 256, (30, 3, 20, 20), dtype=np.uint8), np.repeat(np.arange(3), 10)
    probs = softmax(predict_logits(model, images, PREP))
    idx, mistakes = gradcam_sample(y, probs)
    assert mistakes.any() and (~mistakes).any()
    assert gradcam_figure(model, images, y, probs, ["a", "b", "c"], PREP, tmp_path / "g.png") is None
    w, h = png_size(tmp_path / "g.png")
    assert 500 <= w <= 1400 and 300 <= h <= 1400
    gradcam_figure(model, images, y, probs, ["a", "b", "c"], PREP, tmp_path / "again.png")
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    heat = rng.random((len(idx), 16, 16))
    titles = [f"t{i}" for i in range(len(idx))]
    fig = figures.gradcam_grid_figure(PREP.center_crop(images[idx]), heat, titles, mistakes)
    drawn = [ax for ax in fig.axes if ax.images]
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
    assert len(drawn) == len(idx) and fig.get_suptitle().startswith("Grad-CAM")
    assert not any("Grad-CAM" in ax.get_title() for ax in drawn)  # one caption, not one per image
    reds = [ax.get_title() for ax in drawn if ax.title.get_color() == "tab:red"]
    assert reds == [t for t, m in zip(titles, mistakes) if m]
    plots.plt.close(fig)


# --- misclassified grid and augmented samples ------------------------------------------------------

def test_misclassified_grid_with_one_image_is_narrow(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)
    figures.misclassified_grid(image, ["3 → 8 (0.97)"], tmp_path / "m.png", n_test=100)
    w, _ = png_size(tmp_path / "m.png")
    assert w < 0.5 * 6 * plots.CELL[0] * plots.DPI  # not six columns' width


def test_long_titles_are_wrapped_to_their_cell_and_a_long_heading_widens_the_figure(tmp_path):
    images = np.zeros((3, 3, 16, 16), dtype=np.uint8)
    titles = ["automobile → airplane (0.91)", "a → b (0.5)", "a-very-long-single-word-class-name → b (0.9)"]
    heading = "A heading much wider than one image: " + "x" * 60
    fig, axes = plots.fixed_grid(3, 3, plots.CELL, 1.0, titles, heading)
    shown = [ax.get_title() for ax in axes]
    assert shown[1] == "a → b (0.5)"  # it fits: as it is
    assert shown[0] == "automobile →\nairplane (0.91)" or shown[0].count("\n") == 1
    for title in shown[:2]:
        assert all(plots.text_inches(line, plots.TITLE_PT) <= plots.CELL[0] - plots.GAP for line in title.split("\n"))
    assert shown[2].split("\n")[0] == "a-very-long-single-word-class-name"  # a word is never cut
    assert fig.get_size_inches()[0] >= plots.text_inches(heading, plots.SUPTITLE_PT)  # not clipped
    plots.plt.close(fig)
    plots.image_grid(images, titles, tmp_path / "g.png", heading, cols=3)
    assert png_size(tmp_path / "g.png")[0] >= plots.text_inches(heading, plots.SUPTITLE_PT) * plots.DPI


def augment_setup(augment: AugmentParams) -> Setup:
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, seed=0, augment=augment)
    return Setup(None, {}, PREP, ["a", "b"], cfg, "", "")


@pytest.mark.parametrize("hflip", [False, True])
def test_augmented_samples_pair_each_original_with_its_augmented_version(tmp_path, hflip):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_x.npy", rng.integers(0, 256, (10, 3, 20, 20), dtype=np.uint8))
    np.save(tmp_path / "train_y.npy", np.arange(10) % 2)
    s = augment_setup(AugmentParams(random_crop=False, hflip=hflip))
    originals, augmented = augmented_samples(s, tmp_path / "aug.png", tmp_path, n=8)
    stored = np.load(tmp_path / "train_x.npy")[:8]
    assert (originals == stored[..., 2:18, 2:18]).all()  # as evaluation sees them: the centre crop
    same = [(a == o).all() for a, o in zip(augmented, originals)]
    mirrored = [(a == o[..., ::-1]).all() for a, o in zip(augmented, originals)]
    assert all(sm or mi for sm, mi in zip(same, mirrored))  # each beside its own augmented version
    assert any(mirrored) if hflip else all(same)
    w, h = png_size(tmp_path / "aug.png")
    assert 600 <= w <= 1200 and 200 <= h <= 800


def test_pair_figure_labels_the_columns_once():
    images = np.zeros((6, 3, 8, 8), dtype=np.uint8)
    fig = plots.pair_figure(images, images, [f"c{i}" for i in range(6)], ("original", "augmented"), "pairs", per_row=4)
    drawn = [ax for ax in fig.axes if ax.images]
    headers = [[t.get_text() for t in ax.get_xticklabels()] if ax.axison else [] for ax in drawn]
    assert headers == [["original", "augmented"]] * 4 + [[], []]  # over the first row only
    assert [ax.get_title() for ax in drawn] == [f"c{i}" for i in range(6)]
    plots.plt.close(fig)
