"""The export stage on tiny digits (real ONNX Runtime, real SQLite MLflow store): the ONNX
model describes itself, its latency is measured, a failed parity check writes nothing, and the
model is logged to the run, loads from MLflow, and is registered with its alias."""
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import read_json
from pipeline.export.onnx import model_card, onnx_logits, onnx_session, read_onnx_metadata
from stages import export
from tests.conftest import REGISTERED_MODEL


@pytest.fixture
def store(exported_pipeline):
    """mlflow's global tracking URI pointed at the pipeline's store for one test, then restored."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(exported_pipeline[1])
    yield exported_pipeline
    mlflow.set_tracking_uri(before)


def normalised_test_split(work):
    _, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    prep = ckpt["preprocessing"]
    x = np.load(work / paths.PREPARED_DIR / "test_x.npy").astype(np.float32) / 255
    return ((x - np.float32(prep["mean"])[:, None, None]) / np.float32(prep["std"])[:, None, None]).astype(np.float32)


def test_onnx_metadata_and_json_beside_it_round_trip(exported_pipeline):
    work, _, _ = exported_pipeline
    _, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    props = {p.key: p.value for p in onnx.load(work / paths.ONNX_MODEL).metadata_props}
    assert json.loads(props["classes"]) == [str(i) for i in range(10)] == ckpt["classes"]
    assert json.loads(props["mean"]) == ckpt["preprocessing"]["mean"] and len(json.loads(props["std"])) == 3
    assert json.loads(props["std"]) == ckpt["preprocessing"]["std"]
    assert props["image_size"] == "16" and props["resize"] == "center_crop" and props["arch"] == "original"
    assert ckpt["preprocessing"]["resize"] == read_json(work / paths.PREPARED_META)["preprocessing"]["resize"]  # train records it
    # the same card, read back through ONNX Runtime's API and from the JSON beside the model
    card = read_onnx_metadata(onnx_session(work / paths.ONNX_MODEL).get_modelmeta().custom_metadata_map)
    assert card == read_json(work / paths.ONNX_META) == model_card(ckpt, 0.1)  # evaluate.conformal_alpha: 0.1


def test_export_metrics_have_parity_latency_and_size(exported_pipeline):
    work, _, results = exported_pipeline
    metrics = read_json(work / paths.EXPORT_METRICS) | read_json(work / paths.EXPORT_TIMING)
    assert metrics == results["export"]
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_logit_diff"] <= 1e-4 and metrics["n_checked"] == 270
    latency = {k: v for k, v in metrics.items() if "p50" in k or "p95" in k}
    assert set(latency) == {"torch_latency_ms_p50", "torch_latency_ms_p95", "onnx_latency_ms_p50", "onnx_latency_ms_p95"}
    assert all(v > 0 for v in latency.values())
    assert metrics["torch_latency_ms_p95"] >= metrics["torch_latency_ms_p50"]
    assert metrics["onnx_latency_ms_p95"] >= metrics["onnx_latency_ms_p50"]
    assert 10 <= metrics["torch_latency_runs"] <= 30 and 10 <= metrics["onnx_latency_runs"] <= 30
    assert metrics["onnx_bytes"] == (work / paths.ONNX_MODEL).stat().st_size


def trained_copy(work: Path, tmp_path: Path, monkeypatch) -> None:
    """What export reads of the trained pipeline, copied to `tmp_path`, the working folder."""
    for rel in (paths.CHECKPOINT, paths.MLFLOW_RUN, paths.PARAMS):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / rel, tmp_path / rel)
    shutil.copytree(work / paths.PREPARED_DIR, tmp_path / paths.PREPARED_DIR)
    monkeypatch.chdir(tmp_path)


def test_failed_parity_check_writes_nothing(exported_pipeline, tmp_path, monkeypatch):
    work, uri, _ = exported_pipeline
    trained_copy(work, tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr("pipeline.export.onnx.MAX_ABS_DIFF", 0.0)  # the real ~1e-6 difference now fails the check
    with pytest.raises(UserError, match="ONNX export disagrees"):
        export.main()
    assert not (tmp_path / paths.MODELS_DIR / "model.onnx").exists() and not (tmp_path / paths.ONNX_META).exists()
    assert not (tmp_path / paths.METRICS_DIR).exists()
    assert not list(tmp_path.rglob("*.tmp*"))


def test_mlflow_run_has_the_onnx_model_and_it_predicts(store):
    work, uri, _ = store
    client = MlflowClient(uri)
    run_id = read_json(work / paths.MLFLOW_RUN)["run_id"]
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_id)]
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]

    x = normalised_test_split(work)
    proto = mlflow.onnx.load_model(models[0].model_uri)
    assert {p.key: p.value for p in proto.metadata_props}["classes"] == json.dumps([str(i) for i in range(10)])
    pyfunc = mlflow.pyfunc.load_model(models[0].model_uri)
    assert pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 16, 16)
    [out] = pyfunc.metadata.signature.outputs.to_dict()  # what the graph declares (pipeline.tracking.onnx_signature)
    assert (out["name"], out["tensor-spec"]["dtype"], out["tensor-spec"]["shape"]) == ("logits", "float32", (-1, 10))
    assert pyfunc.metadata.metadata["classes"] == [str(i) for i in range(10)]
    logits = pyfunc.predict(x)["logits"]
    np.testing.assert_allclose(logits, onnx_logits(work / paths.ONNX_MODEL, x), atol=1e-5)


def test_registered_version_carries_the_alias(store):
    work, uri, _ = store
    client = MlflowClient(uri)
    run_id = read_json(work / paths.MLFLOW_RUN)["run_id"]
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert int(version.version) == 1 and version.run_id == run_id and version.aliases == ["champion"]
    [logged] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert version.source == logged.model_uri  # the version is the run's logged model
    x = normalised_test_split(work)[:5]
    served = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion").predict(x)["logits"]
    np.testing.assert_allclose(served, onnx_logits(work / paths.ONNX_MODEL, x), atol=1e-5)


def test_onnx_file_carries_nothing_of_the_machine_that_made_it(exported_pipeline):
    """The dynamo exporter writes a Python stack trace (absolute paths of this checkout and its
    venv) on every node and torch's build tag as producer version: a clone elsewhere wrote
    another file from the same model. Exported files hold neither."""
    import torch

    work, _, _ = exported_pipeline
    data = (work / paths.ONNX_MODEL).read_bytes()
    proto = onnx.load(work / paths.ONNX_MODEL)
    assert not [n.name for n in proto.graph.node if n.metadata_props]
    assert b"site-packages" not in data and str(Path(torch.__file__).parents[1]).encode() not in data
    assert proto.producer_version == torch.__version__.split("+")[0]


@pytest.mark.parametrize("arch, size, exporter", [("original", 16, "torchscript"), ("alexnet", 64, "dynamo")])
def test_each_exporter_writes_the_same_checked_file_twice(tmp_path, arch, size, exporter):
    """TorchScript's exporter writes the file where it can (15-40× faster); where it cannot
    translate an op (AlexNet below 224 px: adaptive pooling from 1×1 to 6×6) the dynamo exporter
    does. Either way: logits as PyTorch's, the card in the metadata, nothing of the machine,
    and the same bytes from the same model."""
    import torch

    from pipeline.export.onnx import export_onnx
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 3).eval()
    first, again = tmp_path / "first.onnx", tmp_path / "again.onnx"
    assert export_onnx(model, size, first, {"arch": arch}) == exporter
    assert export_onnx(model, size, again, {"arch": arch}) == exporter
    assert first.read_bytes() == again.read_bytes()
    x = torch.rand(5, 3, size, size)  # another batch size than the example's 2: the batch axis is dynamic
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits(first, x.numpy()), model(x).numpy(), atol=1e-4)
    proto = onnx.load(first)
    assert {p.key: p.value for p in proto.metadata_props} == {"arch": arch}
    assert proto.producer_version == torch.__version__.split("+")[0] and b"site-packages" not in first.read_bytes()


def test_int8_export_keeps_the_signed_weights_when_they_hold_and_says_so(exported_pipeline, tmp_path, monkeypatch):
    from pipeline.export import run as export_run
    from pipeline.core.params import ExportParams

    trained_copy(exported_pipeline[0], tmp_path, monkeypatch)
    result = export_run.run(0.1, ExportParams(int8=True, int8_max_drop=1.0))
    card = read_json(tmp_path / paths.INT8_DIR / "model.json")
    assert result["int8_kept"] and result["int8_weights"] == card["int8_weights"] == "int8" and card["precision"] == "int8"
    props = read_onnx_metadata(onnx_session(tmp_path / paths.INT8_DIR / "model.onnx").get_modelmeta().custom_metadata_map)
    assert props == card
    assert sorted(p.name for p in (tmp_path / paths.INT8_DIR).iterdir()) == ["model.json", "model.onnx"]
    assert result["int8_top1_agreement"] > 0.9 and result["int8_bytes"] < result["onnx_bytes"]


def test_the_onnx_check_runs_on_every_test_image_or_on_parity_images_spread_over_them():
    from pipeline.export.run import PARITY_IMAGES, parity_subset

    assert parity_subset(270).tolist() == list(range(270))
    picked = parity_subset(10_000)
    assert len(picked) == PARITY_IMAGES == len(set(picked.tolist())) and picked[0] == 0 and picked[-1] == 9_999
    assert np.all(np.diff(picked) >= 19)  # spread evenly: every class of a class-sorted split is in it
