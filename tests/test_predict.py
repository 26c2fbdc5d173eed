"""`python -m pipeline predict` as a user runs it (real subprocess, real ONNX Runtime), with the
exported ONNX model and with the checkpoint: it agrees with the evaluate stage on the test
split, applies the evaluation preprocessing to images of other sizes and modes, and reports
unreadable files one line each while still predicting the others. Without --model it runs
models/model.onnx; several images give one line each, a per-class summary and the accuracy
against class folders, a progress bar on stderr only, and --out a CSV of every probability."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from pipeline.checkpoint import load_checkpoint, predict_logits, preprocessing, temperature
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.images import resize
from pipeline.evaluation.metrics import softmax
from pipeline.export.predict import load_predictor
from tests.conftest import clean_env, run

MODELS = {"onnx": paths.ONNX_MODEL, "checkpoint": paths.CHECKPOINT}
# |log-probability| difference allowed vs PyTorch on the same input: ONNX Runtime's logits may
# differ by up to the export limit 1e-4 (so log-probabilities by 2e-4); the checkpoint is PyTorch
# itself, at another batch size. Log space, because confident predictions saturate probabilities.
TOLERANCE = {"onnx": 2e-4, "checkpoint": 1e-5}


def predict(work, model: str, files, *args, check=True):
    cmd = [sys.executable, "-m", "pipeline", "predict", "--model", str(work / MODELS[model]), *map(str, files), *args]
    return run(cmd, work, check=check)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def table_rows(stdout: str) -> list[list[str]]:
    """The words of each line of the table of several images (its header checked and dropped)."""
    lines = stdout.split("\n\n")[0].splitlines()
    assert lines[0].split() == ["image", "class", "prob", "next"]
    return [line.split() for line in lines[1:]]


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
                      f"error: {bad[2]}: decompression bomb (more pixels than the limit, 1,000); resize it to fewer pixels",
                      f"error: {bad[3]}: decompression bomb (more pixels than the limit, 1,000); resize it to fewer pixels"]
    evaluated = pd.read_csv(work / paths.PREDICTIONS)["predicted"].astype(str).tolist()
    rows = table_rows(proc.stdout)
    assert [r[0] for r in rows] == [str(test_pngs[i]) for i in range(3)]
    assert [r[1] for r in rows] == evaluated[:3]  # the top-1 class
    assert all(len(r) == 3 + 2 * 2 for r in rows)  # path, class, probability and the next 2 classes
    assert "7 images: 3 predicted, 4 failed (on stderr)" in proc.stdout
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

    from pipeline.core.preprocess import Preprocessing

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


def test_without_a_model_it_runs_models_model_onnx_of_the_working_directory(exported_pipeline, test_pngs, tmp_path):
    work = exported_pipeline[0]
    (tmp_path / paths.MODELS_DIR).mkdir()
    shutil.copy(work / paths.ONNX_MODEL, tmp_path / paths.ONNX_MODEL)
    cmd = [sys.executable, "-m", "pipeline", "predict", str(test_pngs[0]), str(test_pngs[1]), "--json"]
    out = json_lines(run(cmd, tmp_path).stdout)
    assert out == json_lines(predict(work, "onnx", test_pngs[:2], "--json").stdout)
    (tmp_path / paths.ONNX_MODEL).unlink()  # no default model: one line saying how to make it
    proc = run(cmd, tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: no --model given and the default models/model.onnx does not exist here; make it with "
        "`dvc repro export` (`dvc repro` runs the whole pipeline), or pass --model models/model.pt"]


def test_the_older_form_model_first_still_works_and_one_image_gets_its_top_k(exported_pipeline, test_pngs):
    work = exported_pipeline[0]
    cmd = [sys.executable, "-m", "pipeline", "predict", str(work / paths.CHECKPOINT), str(test_pngs[0])]
    older = run(cmd, work).stdout
    assert older == predict(work, "checkpoint", [test_pngs[0]]).stdout
    lines = older.splitlines()
    assert lines[0] == str(test_pngs[0]) and lines[1].split() == ["rank", "label", "probability"]
    assert len(lines) == 2 + 5 + 1  # the default top 5, then the prediction set (evaluate.conformal_alpha: 0.1)
    assert lines[-1].startswith("  set at α = 0.1 (holds the true class 90% of the time): ")
    stray = run(cmd[:4] + [str(test_pngs[0]), str(work / paths.ONNX_MODEL)], work, check=False)
    assert stray.returncode == 2 and stray.stderr.splitlines() == [
        f"error: {work / paths.ONNX_MODEL} looks like a model, not an image; give one model, first or with -m/--model"]


def class_folders(work, test_pngs, root) -> dict:
    """23 test images as root/test/<class>/, root/<class>/ and root/loose/ (no class) files; the
    first one in the folder of a class the model does not predict for it. {file: (index, folder label)}."""
    y = np.load(work / paths.PREPARED_DIR / "test_y.npy")
    evaluated = pd.read_csv(work / paths.PREDICTIONS)["predicted"].astype(int).tolist()
    placed = {}
    for i in range(23):
        label = str((evaluated[0] + 1) % 10) if i == 0 else str(y[i])
        dest = root / "test" / label if i < 20 else root / label if i < 22 else root / "loose"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(test_pngs[i], dest / f"{i:03d}.png")
        placed[dest / f"{i:03d}.png"] = (i, None if i == 22 else label)
    return placed


def test_a_folder_is_one_line_per_image_then_a_summary_per_class_and_the_accuracy(exported_pipeline, test_pngs,
                                                                                  tmp_path):
    work = exported_pipeline[0]
    placed = class_folders(work, test_pngs, tmp_path / "photos")
    proc = predict(work, "onnx", [tmp_path / "photos"], "--alpha", "0")  # the table alone: sets in test_conformal.py
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    evaluated = pd.read_csv(work / paths.PREDICTIONS)["predicted"].astype(str).tolist()
    rows = table_rows(proc.stdout)
    assert sorted(r[0] for r in rows) == sorted(map(str, placed)) and len(rows) == 23
    predicted = {r[0]: r[1] for r in rows}
    for r in rows:
        i, label = placed[Path(r[0])]
        assert r[1] == evaluated[i] and len(r) == 3 + 2 * 2 + 2 * (label not in (None, r[1]))
        assert r[-2:] == ["(folder:", f"{label})"] if label not in (None, r[1]) else "(folder:" not in r
    as_json = json_lines(predict(work, "onnx", placed, "--json").stdout)
    probs = {o["image"]: o["top_k"][0]["probability"] for o in as_json}
    summary = proc.stdout.split("\n\n")[1].splitlines()
    assert summary[0].split() == ["class", "predicted", "mean", "prob", "in", "folder", "right"]
    per_class = {line.split()[0]: line.split()[1:] for line in summary[1:-2]}
    labels = {str(f): label for f, (_, label) in placed.items()}
    for c, (n, mean, in_folder, right) in per_class.items():
        mine = [f for f, p in predicted.items() if p == c]
        assert int(n) == len(mine) and float(mean) == pytest.approx(np.mean([probs[f] for f in mine]), abs=6e-4)
        assert int(in_folder) == list(labels.values()).count(c)
        assert int(right) == sum(labels[f] == c for f in mine)
    assert sum(int(v[0]) for v in per_class.values()) == 23
    right = sum(labels[f] == p for f, p in predicted.items())
    assert right <= 21  # the first image sits in another class's folder
    assert summary[-2].startswith(f"23 images: 23 predicted, 0 failed; model {work / paths.ONNX_MODEL}, ")
    assert summary[-1] == (f"accuracy against the class folders: {right / 22:.1%} ({right} of 22 right, "
                           f"{22 - right} wrong; 1 not in a class folder)")


def test_out_writes_one_csv_row_per_image_with_every_probability(exported_pipeline, test_pngs, tmp_path):
    work = exported_pipeline[0]
    placed = class_folders(work, test_pngs, tmp_path / "photos")
    broken = tmp_path / "photos" / "test" / "3" / "broken.jpg"
    broken.write_text("not a jpeg\n")
    out = tmp_path / "preds.csv"
    proc = predict(work, "onnx", [tmp_path / "photos"], "--out", out, "--alpha", "0", check=False)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: {broken}: not an image (cannot identify)", f"predict: wrote {out} (24 rows, one per image)"]
    assert "24 images: 23 predicted, 1 failed (on stderr)" in proc.stdout
    csv = pd.read_csv(out, dtype={"image": str, "predicted": str, "label": str, "error": str})
    classes = [str(c) for c in range(10)]
    assert csv.columns.tolist() == ["image", "predicted", "probability", "label", "error"] + [f"p_{c}" for c in classes]
    assert sorted(csv["image"]) == sorted(map(str, [*placed, broken]))
    ok, bad = csv[csv["image"] != str(broken)], csv[csv["image"] == str(broken)]
    p = ok[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    assert ok["predicted"].tolist() == [classes[i] for i in p.argmax(axis=1)]
    np.testing.assert_allclose(ok["probability"], p.max(axis=1))
    assert ok["predicted"].tolist() == [r[1] for r in table_rows(proc.stdout)]  # the table's order and classes
    assert ok["label"].fillna("").tolist() == [placed[Path(f)][1] or "" for f in ok["image"]]
    assert ok["error"].isna().all() and bad["error"].tolist() == ["not an image (cannot identify)"]
    assert bad[["predicted", "probability", *[f"p_{c}" for c in classes]]].isna().all(axis=None)


def read_terminal(fd: int, into: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            return
        if not chunk:
            return
        into.append(chunk)


def test_the_progress_bar_is_drawn_on_a_terminals_stderr_never_on_stdout(exported_pipeline, test_pngs):
    import fcntl
    import struct
    import termios
    import threading

    work = exported_pipeline[0]
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns, as a terminal has
    cmd = [sys.executable, "-m", "pipeline", "predict", "-m", str(work / paths.ONNX_MODEL), *map(str, test_pngs[:20])]
    proc = subprocess.Popen(cmd, cwd=work, env=clean_env(), stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    drawn: list[bytes] = []
    reader = threading.Thread(target=read_terminal, args=(leader, drawn))
    reader.start()
    stdout = proc.communicate(timeout=300)[0]
    reader.join(timeout=30)
    os.close(leader)
    terminal = b"".join(drawn).decode()
    assert proc.returncode == 0 and re.search(r"predict: +\d+%\|.*\| *\d+/20 ", terminal)
    assert "\r" not in stdout and "/20" not in stdout and "%|" not in stdout
    assert len(table_rows(stdout)) == 20 and "20 images: 20 predicted, 0 failed" in stdout
