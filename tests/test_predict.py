"""`python -m pipeline predict` as a user runs it (real subprocess, real ONNX Runtime), with the
exported ONNX model and with the checkpoint: it agrees with the evaluate stage on the test
split, applies the evaluation preprocessing to images of other sizes and modes, and reports
unreadable files one line each while still predicting the others."""
import json
import sys

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from pipeline import paths
from pipeline.checkpoint import load_checkpoint, predict_logits, preprocessing, temperature
from pipeline.errors import UserError
from pipeline.evaluation.metrics import softmax
from pipeline.export.predict import load_predictor
from pipeline.images import resize
from tests.conftest import run

MODELS = {"onnx": paths.ONNX_MODEL, "checkpoint": paths.CHECKPOINT}
# |log-probability| difference allowed vs PyTorch on the same input: ONNX Runtime's logits may
# differ by up to the export limit 1e-4 (so log-probabilities by 2e-4); the checkpoint is PyTorch
# itself, at another batch size. Log space, because confident predictions saturate probabilities.
TOLERANCE = {"onnx": 2e-4, "checkpoint": 1e-5}


def predict(work, model: str, files, *args, check=True):
    cmd = [sys.executable, "-m", "pipeline", "predict", str(work / MODELS[model]), *map(str, files), *args]
    return run(cmd, work, check=check)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def test_pngs(exported_pipeline, tmp_path_factory):
    """The prepared test split written as PNG files at the prepared size (resize is the identity)."""
    work = exported_pipeline[0]
    folder = tmp_path_factory.mktemp("test_pngs")
    x = np.load(work / paths.PREPARED_DIR / "test_x.npy")
    files = [folder / f"{i:03d}.png" for i in range(len(x))]
    for f, image in zip(files, x):
        Image.fromarray(image.transpose(1, 2, 0)).save(f)
    return files


@pytest.mark.parametrize("model", MODELS)
def test_predict_agrees_with_the_evaluate_stage(exported_pipeline, test_pngs, model):
    work = exported_pipeline[0]
    out = json_lines(predict(work, model, test_pngs, "--json", "--top-k", "3").stdout)
    evaluated = pd.read_csv(work / paths.PREDICTIONS)
    assert [o["image"] for o in out] == [str(f) for f in test_pngs]
    assert [o["top_k"][0]["label"] for o in out] == evaluated["predicted"].astype(str).tolist()
    # probabilities: best first, and the checkpoint's calibrated ones (logits / T) on the prepared arrays
    net, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    x = np.load(work / paths.PREPARED_DIR / "test_x.npy")
    probs = softmax(predict_logits(net, x, preprocessing(ckpt)) / temperature(ckpt))
    for o, p in zip(out, probs):
        got = [t["probability"] for t in o["top_k"]]
        assert len(got) == 3 and got == sorted(got, reverse=True)
        np.testing.assert_allclose(np.log(got), np.log(np.sort(p)[::-1][:3]), atol=TOLERANCE[model])


def other_sizes_and_modes(work, folder) -> dict:
    """Test images enlarged to non-square sizes as RGBA (transparent pixels hold black, so
    dropping alpha instead of compositing on white changes them) and as L; each with the
    RGB array the evaluation preprocessing must see before resizing, built by hand."""
    x = np.load(work / paths.PREPARED_DIR / "test_x.npy")[:4]
    rng = np.random.default_rng(0)
    out = {}
    for i, image in enumerate(x):
        gray = image[0]  # digits: the three channels are equal
        big = np.asarray(Image.fromarray(gray).resize((40, 28) if i % 2 else (24, 52), Image.Resampling.NEAREST))
        alpha = np.where(rng.random(big.shape) < 0.3, 0, 255).astype(np.uint8)
        rgba = np.dstack([big, big // 2, big, alpha])
        rgba[alpha == 0, :3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / f"rgba{i}.png")
        out[folder / f"rgba{i}.png"] = np.where(alpha[..., None] == 0, 255, rgba[..., :3]).astype(np.uint8)
        Image.fromarray(big, "L").save(folder / f"gray{i}.png")
        out[folder / f"gray{i}.png"] = np.repeat(big[..., None], 3, axis=2)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_other_sizes_and_modes_get_the_evaluation_preprocessing(exported_pipeline, tmp_path, model):
    work = exported_pipeline[0]
    expected_rgb = other_sizes_and_modes(work, tmp_path)
    net, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    prep = ckpt["preprocessing"]
    assert prep["resize"] == "center_crop"

    def by_hand(rgb: np.ndarray, policy: str = prep["resize"]) -> np.ndarray:
        """Log-probabilities (calibrated) of the checkpoint on `rgb` resized and normalised as evaluation does."""
        x = resize(rgb, prep["image_size"], policy).transpose(2, 0, 1)[None]
        return np.log(softmax(predict_logits(net, x, preprocessing(ckpt)) / temperature(ckpt))[0])

    out = json_lines(predict(work, model, list(expected_rgb), "--json", "--top-k", "10").stdout)
    assert [o["image"] for o in out] == [str(f) for f in expected_rgb]
    for o, (path, rgb) in zip(out, expected_rgb.items()):
        got = {t["label"]: t["probability"] for t in o["top_k"]}
        expected = by_hand(rgb)
        np.testing.assert_allclose(np.log([got[c] for c in ckpt["classes"]]), expected, atol=TOLERANCE[model],
                                   err_msg=path.name)
        # the comparison can tell: stretching instead of cropping gives other probabilities
        assert np.abs(by_hand(rgb, "stretch") - expected).max() > 10 * TOLERANCE[model]
        if path.name.startswith("rgba"):  # and so does dropping alpha instead of compositing on white
            dropped = np.asarray(Image.open(path).convert("RGB"))
            assert np.abs(by_hand(dropped) - expected).max() > 10 * TOLERANCE[model]


def test_unreadable_files_are_one_line_each_and_the_rest_is_predicted(exported_pipeline, test_pngs, tmp_path):
    work = exported_pipeline[0]
    (tmp_path / "notes.jpg").write_text("not an image\n")
    Image.new("L", (40, 40), 128).save(tmp_path / "bomb_warns.png")   # 1,600 px: above a 1,000 px limit
    Image.new("L", (64, 64), 128).save(tmp_path / "bomb_errors.png")  # 4,096 px: above twice the limit
    missing = tmp_path / "missing.png"
    bad = [missing, tmp_path / "notes.jpg", tmp_path / "bomb_warns.png", tmp_path / "bomb_errors.png"]
    files = [test_pngs[0], bad[0], bad[1], test_pngs[1], bad[2], bad[3], test_pngs[2]]
    proc = predict(work, "onnx", files, "--max-pixels", "1000", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: unreadable: No such file or directory",
                      f"error: {bad[1]}: not an image (cannot identify)",
                      f"error: {bad[2]}: decompression bomb (more pixels than the limit, 1,000)",
                      f"error: {bad[3]}: decompression bomb (more pixels than the limit, 1,000)"]
    evaluated = pd.read_csv(work / paths.PREDICTIONS)["predicted"].astype(str).tolist()
    tables = proc.stdout.strip().split("\n\n")
    assert [t.splitlines()[0] for t in tables] == [str(test_pngs[i]) for i in range(3)]
    assert [t.splitlines()[2].split()[1] for t in tables] == evaluated[:3]  # rank 1's label
    assert all(len(t.splitlines()) == 2 + 5 for t in tables)  # header + the default top 5
    # without the limit, the same two large images are ordinary images
    ok = predict(work, "checkpoint", bad[2:], "--json")
    assert [o["image"] for o in json_lines(ok.stdout)] == [str(f) for f in bad[2:]]


def test_a_bad_model_path_is_one_line(exported_pipeline, test_pngs, tmp_path):
    work = exported_pipeline[0]
    proc = run([sys.executable, "-m", "pipeline", "predict", str(tmp_path / "nope.onnx"), str(test_pngs[0])],
               tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: model '{tmp_path / 'nope.onnx'}' is not a file; give "
                                        "models/model.onnx (dvc repro export) or models/model.pt (dvc repro train)"]
    (tmp_path / "model.onnx").write_text("not onnx")
    with pytest.raises(UserError, match="is not a readable ONNX model"):
        load_predictor(tmp_path / "model.onnx")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_predictor(work / paths.ONNX_META)


def test_onnx_without_metadata_falls_back_to_the_json_beside_it(exported_pipeline, tmp_path):
    work = exported_pipeline[0]
    proto = onnx.load(work / paths.ONNX_MODEL)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with pytest.raises(UserError, match="no classes/preprocessing in its metadata and there is no bare.json"):
        load_predictor(tmp_path / "bare.onnx")
    card = json.loads((work / paths.ONNX_META).read_text())
    card["classes"] = [f"digit {c}" for c in card["classes"]]  # so we can see which source was read
    (tmp_path / "bare.json").write_text(json.dumps(card))
    predictor = load_predictor(tmp_path / "bare.onnx")
    assert predictor.classes == card["classes"] and predictor.image_size == 16 and predictor.resize == "center_crop"
    x = np.load(work / paths.PREPARED_DIR / "test_x.npy")[:8]
    assert (predictor.logits(x).argmax(1) == load_predictor(work / paths.ONNX_MODEL).logits(x).argmax(1)).all()


def test_onnx_predict_never_imports_torch_and_says_nothing_on_stderr(exported_pipeline, test_pngs):
    """The ONNX path is numpy, Pillow and ONNX Runtime only (torch alone took 850 MB and most of
    3 s for one image); and it asks ONNX Runtime only for providers this machine has, so no
    provider warning either (Python warnings shown, as a user's shell shows them)."""
    work = exported_pipeline[0]
    cmd = [sys.executable, "-X", "importtime", "-m", "pipeline", "predict", str(work / paths.ONNX_MODEL),
           str(test_pngs[0]), "--json"]
    proc = run(cmd, work, PYTHONWARNINGS="default")
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "numpy" in imported and "onnxruntime" in imported
    assert [m for m in imported if m.split(".")[0] in ("torch", "torchvision", "timm")] == []
    assert [line for line in proc.stderr.splitlines() if not line.startswith("import time:")] == []
    assert json_lines(proc.stdout)[0]["image"] == str(test_pngs[0])


def test_onnx_sessions_ask_only_for_providers_that_can_run(exported_pipeline):
    import onnxruntime as ort

    from pipeline.export.runtime import CPU, CUDA, choose_providers, cuda_device_count, onnx_session

    assert choose_providers([CUDA, CPU], cuda_devices=0) == [CPU]          # the GPU wheel on a CPU machine
    assert choose_providers(["AzureExecutionProvider", CPU], cuda_devices=1) == [CPU]  # the CPU wheel on a GPU machine
    assert choose_providers([CUDA, CPU], cuda_devices=1) == [CUDA, CPU]
    sess = onnx_session(exported_pipeline[0] / paths.ONNX_MODEL)
    expected = choose_providers(ort.get_available_providers(), cuda_device_count())
    assert sess.get_providers() == expected and set(expected) <= set(ort.get_available_providers())


def test_numpy_preprocessing_is_the_torch_one_bit_for_bit(prepared_digits):
    import torch

    from pipeline.preprocess import Preprocessing

    x = np.load(prepared_digits / "test_x.npy")  # uint8, 16 px
    for prep in (Preprocessing(12, 16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # with a centre crop
                 Preprocessing(16, 16, mean=(0.3,) * 3, std=(0.32,) * 3)):
        with_torch = prep.model_input(torch.from_numpy(x)).numpy()
        with_numpy = prep.model_input(x)
        assert isinstance(with_numpy, np.ndarray) and with_numpy.dtype == np.float32
        assert with_numpy.shape == with_torch.shape == (len(x), 3, prep.image_size, prep.image_size)
        assert with_numpy.tobytes() == np.ascontiguousarray(with_torch).tobytes()
        floats = x[:8].astype(np.float32) / 255  # float input is standardised as is
        assert prep.normalize(floats).tobytes() == prep.normalize(torch.from_numpy(floats)).numpy().tobytes()


def test_a_folder_is_its_image_files_recursively_sorted(exported_pipeline, test_pngs, tmp_path):
    work = exported_pipeline[0]
    folder = tmp_path / "photos"
    (folder / "b_sub" / "deeper").mkdir(parents=True)
    (folder / ".thumbs").mkdir()
    placed = {folder / "z.png": test_pngs[0], folder / "a.PNG": test_pngs[1],
              folder / "b_sub" / "deeper" / "c.png": test_pngs[2], folder / "b_sub" / "b.png": test_pngs[3]}
    for dest, src in placed.items():
        dest.write_bytes(src.read_bytes())
    (folder / ".thumbs" / "z.png").write_bytes(test_pngs[4].read_bytes())  # hidden: skipped
    (folder / "notes.txt").write_text("not an image\n")                     # other extension: skipped
    (folder / "labels.csv").write_text("a,b\n")
    (folder / "b_sub" / "broken.jpg").write_text("not a jpeg\n")            # an image extension: read, reported
    proc = predict(work, "onnx", [folder, test_pngs[5]], "--json", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"{folder}: skipped 3 files (not images by extension: .csv, .txt; hidden: 1)",
        f"error: {folder / 'b_sub' / 'broken.jpg'}: not an image (cannot identify)"]
    order = [folder / "a.PNG", folder / "b_sub" / "b.png", folder / "b_sub" / "deeper" / "c.png", folder / "z.png"]
    out = json_lines(proc.stdout)
    assert [o["image"] for o in out] == [str(f) for f in order] + [str(test_pngs[5])]
    evaluated = pd.read_csv(work / paths.PREDICTIONS)["predicted"].astype(str).tolist()
    sources = [test_pngs.index(placed[f]) for f in order] + [5]
    assert [o["top_k"][0]["label"] for o in out] == [evaluated[i] for i in sources]


@pytest.mark.parametrize("content", ["nothing", "no images"])
def test_a_folder_without_images_is_one_line(exported_pipeline, tmp_path, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    if content == "no images":
        (folder / "readme.md").write_text("hi\n")
    proc = predict(exported_pipeline[0], "onnx", [folder], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    why = "it is empty" if content == "nothing" else "skipped 1 file (not images by extension: .md)"
    assert proc.stderr.splitlines() == [f"error: folder '{folder}' has no image files: {why}; predict looks for "
                                        ".bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp in it and its subfolders"]
