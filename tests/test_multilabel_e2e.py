"""task=multilabel end to end through the real `dvc` CLI: a folder of planted shapes (several per
image, some with none) and its labels.csv; the model learns them, the thresholds reach the
checkpoint and the ONNX model, ONNX Runtime agrees with PyTorch, predict prints label sets, and a
bad CSV is one line that touches no output."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import clean_env, run, set_params
from tests.shapes import SHAPES, make_shapes

pytestmark = pytest.mark.slow


def _predict(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "predict", *args], cwd=project, capture_output=True,
                          text=True, env=clean_env(), timeout=300)


def test_multilabel_folder_end_to_end(project: Path):
    make_shapes(project / "shapes", n=300)
    set_params(project, **{"dataset": "folder", "data_dir": "shapes", "task": "multilabel", "epochs": 12,
                           "image_size": 32, "evaluate.tta": "hflip", "export.int8": True,
                           "export.int8_max_drop": 0.05})
    done = run(["dvc", "repro"], project)
    out = done.stdout
    assert "test mAP" in out, out[-2000:]
    assert "nanobind" not in out + done.stderr  # no leak report at a stage's exit

    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == list(SHAPES)
    y = {s: np.load(project / f"data/prepared/{s}_y.npy") for s in ("train", "val", "test")}
    assert all(v.dtype == np.uint8 and v.shape[1] == 4 for v in y.values())
    rates = np.stack([v.mean(axis=0) for v in y.values()])  # iterative stratification: each label's share per split
    assert np.abs(rates - rates.mean(axis=0)).max() < 0.08, rates
    card = json.loads((project / "metrics/data_card.json").read_text())
    assert set(card["multilabel"]["positive_rate"]) == set(SHAPES) and card["multilabel"]["images_without_label"] > 0

    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["map_macro"] > 0.85, ev                    # the shapes are learned (0.5 would be chance-level AP ~0.4)
    assert ev["f1_micro"] > 0.75 and 0 <= ev["hamming_loss"] < 0.2
    assert {"map_macro_tta", "ece_calibrated", "subset_accuracy"} <= set(ev)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("shapes")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.data.metrics["test/map_macro"] == pytest.approx(ev["map_macro"], abs=1e-4)
    assert "map/val" in mlrun.data.metrics and "train/best_val_map" in mlrun.data.metrics
    view = json.loads(exp.tags["mlflow.sharedViewState.best-first"])
    assert view["orderByKey"] == "metrics.`test/map_macro`"

    ckpt = torch.load(project / "models/model.pt", weights_only=True)
    assert ckpt["task"] == "multilabel" and len(ckpt["thresholds"]) == 4
    assert all(0 < t < 1 for t in ckpt["thresholds"])

    # the ONNX model: two outputs, probabilities = sigmoid(logits), the thresholds in its card
    import onnxruntime as ort

    sess = ort.InferenceSession(str(project / "models/model.onnx"), providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["thresholds"]) == ckpt["thresholds"] and props["task"] == '"multilabel"'
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    logits, probs = sess.run(None, {"images": x})
    assert np.allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-6)
    exported = json.loads((project / "metrics/export.json").read_text())
    assert exported["max_abs_logit_diff"] < 1e-4
    assert exported["fp32_accuracy"] == pytest.approx(ev["map_macro"], abs=1e-3)  # INT8 checked by mAP
    assert exported["int8_kept"] and exported["int8_top1_agreement"] > 0.9

    # predict: the sets, from the ONNX model and the checkpoint alike
    one = _predict(project, "shapes/images/0001.png", "--json")
    assert one.returncode == 0, one.stderr
    line = json.loads(one.stdout)
    said = {s["label"] for s in line["scores"] if s["probability"] >= s["threshold"]}
    assert set(line["labels"]) == said and len(line["scores"]) == 4
    many = _predict(project, "-m", "models/model.pt", "shapes/images", "--out", "sets.csv")
    assert many.returncode == 0 and "labels per image" in many.stdout, many.stderr
    import pandas as pd

    table = pd.read_csv(project / "sets.csv", keep_default_na=False)
    assert len(table) == 300 and list(table.columns[:3]) == ["image", "labels", "error"]
    truth = pd.read_csv(project / "shapes/labels.csv", keep_default_na=False).set_index("path")["labels"]
    right = [set(filter(None, p.split(";"))) == set(filter(None, truth[Path(i).relative_to("shapes").as_posix()]
                                                           .split(";"))) for i, p in zip(table["image"], table["labels"])]
    assert np.mean(right) > 0.5  # whole label sets right for most images (subset accuracy, train images included)

    # nothing changed: nothing runs; trained again: the same bytes; a bad CSV: one line, no output touched
    assert "didn't change" in run(["dvc", "repro"], project).stdout
    before = {p: p.read_bytes() for p in (project / "metrics/eval.json", project / "models/model.pt")}
    run(["dvc", "repro", "-f", "-s", "train"], project)
    assert (project / "models/model.pt").read_bytes() == before[project / "models/model.pt"]
    for text, message in (("file,tags\nimages/0000.png,circle\n", "has no path or labels column (its columns: file, tags)"),
                          ("path,labels\nimages/0000.png,circle\nimages/0001.png,\n", "names 1 label(s)")):
        (project / "shapes/labels.csv").write_text(text)
        bad = run(["dvc", "repro"], project, check=False)
        assert bad.returncode != 0
        assert message in bad.stdout + bad.stderr and "Traceback" not in bad.stdout + bad.stderr
        assert all(p.read_bytes() == b for p, b in before.items())
        assert (project / "data/prepared/meta.json").exists()  # refused by check, before DVC removed prepare's outputs
