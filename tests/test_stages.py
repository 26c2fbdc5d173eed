"""Each stage's main() in-process on tiny digits, with a real SQLite MLflow store:
what it returns, what it writes, and what the MLflow run holds (completed by the report stage,
also when DVC skipped train)."""

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint, predict_logits, preprocessing
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import read_json
from pipeline.evaluation.metrics import classification_metrics
from pipeline.export.onnx import MAX_ABS_DIFF, check_parity, onnx_logits, parity
from pipeline.prepared import load_split
from stages import check, download, evaluate, export, prepare, report, train
from tests.conftest import ROOT, TINY, set_params


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Run every stage once in a temporary working directory."""
    work = tmp_path_factory.mktemp("work")
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(work, **TINY, **{"export.int8": True, "export.int8_max_drop": 0.05})  # 2 epochs at 16 px: a loose gate
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    uri = f"sqlite:///{work / 'store.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("DVC_EXP_NAME", "tiny-exp")
    try:
        check.main()
        download.main()
        results = {"prepare": prepare.main(), "train": train.main(), "evaluate": evaluate.main(),
                   "export": export.main(), "report": report.main()}
        yield work, uri, results
    finally:
        mp.undo()


def test_outputs_and_returned_metrics_agree(pipeline_run):
    work, _, results = pipeline_run
    for rel in (paths.CHECKPOINT, paths.MLFLOW_RUN, paths.ONNX_MODEL, paths.ONNX_META, paths.TRAIN_HISTORY,
                paths.PER_CLASS, paths.PREDICTIONS, paths.CONFUSION_JSON, paths.CONFUSION_PNG, paths.LEARNING_CURVES_PNG,
                paths.AUGMENTED_SAMPLES_PNG, paths.MISCLASSIFIED_PNG, paths.GRADCAM_PNG, paths.EVAL_REPORT_MD,
                paths.EVAL_REPORT_HTML):
        assert (work / rel).stat().st_size > 0, rel
    assert read_json(work / paths.EVAL_METRICS) == results["evaluate"]
    assert set(results["evaluate"]) == {  # 10 classes: top-5 is reported
        "accuracy", "balanced_accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro",
        "precision_weighted", "recall_weighted", "f1_weighted", "log_loss", "ece", "n_test",
        "temperature", "log_loss_calibrated", "ece_calibrated",  # evaluate.tta: none (the default)
        "conformal_alpha", "conformal_threshold", "coverage", "set_size_mean", "set_size_median", "singleton_share",
        "singleton_accuracy"}  # evaluate.conformal_alpha: 0.1 (the default)
    assert read_json(work / paths.TRAIN_METRICS) == results["train"]
    assert read_json(work / paths.EXPORT_METRICS) | read_json(work / paths.EXPORT_TIMING) == results["export"]
    assert results["evaluate"]["accuracy"] > 0.8  # 2 epochs at 16 px: it learns
    assert results["export"]["top1_agreement"] == 1.0 and results["export"]["max_abs_logit_diff"] <= MAX_ABS_DIFF
    assert results["export"]["onnx_latency_ms_p50"] > 0 and results["export"]["torch_latency_ms_p95"] > 0
    assert not list(work.rglob("*.tmp*"))  # no temporary files left behind


def test_the_int8_model_is_checked_on_the_whole_test_split_and_predicts(pipeline_run):
    from pipeline.export.onnx import onnx_logits, read_onnx_metadata
    from pipeline.export.predict import load_predictor
    from pipeline.export.runtime import onnx_session

    work, _, results = pipeline_run
    exported = results["export"]
    int8 = work / paths.INT8_DIR / "model.onnx"
    assert exported["int8_kept"] and exported["int8_bytes"] == int8.stat().st_size
    assert exported["int8_bytes"] < 0.4 * exported["onnx_bytes"]  # int8 weights: about a quarter
    x, y = load_split("test", work / paths.PREPARED_DIR)
    _, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    logits = onnx_logits(int8, preprocessing(ckpt).model_input(torch.from_numpy(np.array(x))).numpy())
    assert (logits.argmax(1) == y).mean() == pytest.approx(exported["int8_accuracy"])
    assert exported["fp32_accuracy"] == pytest.approx(results["evaluate"]["accuracy"], abs=1e-6)
    assert exported["int8_accuracy_drop"] <= 0.05 and exported["int8_top1_agreement"] > 0.9
    card = read_onnx_metadata(onnx_session(int8).get_modelmeta().custom_metadata_map)
    assert card["precision"] == "int8" and card["classes"] == ckpt["classes"]
    assert load_predictor(int8).sets is not None  # predict runs it like the FP32 model, sets and all
    assert {"int8_latency_ms_batch1", "int8_latency_ms_batch32", "fp32_latency_ms_batch32"} <= set(exported)


def test_history_and_best_epoch(pipeline_run):
    work, _, results = pipeline_run
    history = pd.read_csv(work / paths.TRAIN_HISTORY)
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(history)
    # what varies from run to run is kept out of the DVC outputs, in a file of its own
    assert "images_per_second" not in history and "train_seconds" not in results["train"]
    assert read_json(work / paths.TRAIN_TIMING)["train_images_per_second"] > 0
    best = results["train"]["best_epoch"]
    assert history["val_accuracy"].max() == pytest.approx(history.loc[best - 1, "val_accuracy"])


def test_checkpoint_describes_itself_and_reproduces_evaluation(pipeline_run):
    work, _, results = pipeline_run
    model, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    assert ckpt["arch"] == "original" and ckpt["classes"] == [str(i) for i in range(10)]
    assert ckpt["preprocessing"]["image_size"] == 16 and len(ckpt["preprocessing"]["mean"]) == 3
    assert ckpt["params"]["epochs"] == 2
    x, y = load_split("test", work / paths.PREPARED_DIR)
    pred = predict_logits(model, x, preprocessing(ckpt)).argmax(1)
    assert (pred == y).mean() == pytest.approx(results["evaluate"]["accuracy"])
    predictions = pd.read_csv(work / paths.PREDICTIONS)
    assert list(predictions.columns) == ["actual", "predicted"] and len(predictions) == len(y)
    assert (predictions["actual"] == predictions["predicted"]).mean() == pytest.approx(results["evaluate"]["accuracy"])
    # the prediction sets: the checkpoint's validation scores give q̂; the card carries it; coverage recomputed
    from pipeline.calibration import scaled
    from pipeline.checkpoint import conformal_threshold, temperature
    from pipeline.conformal import prediction_sets
    from pipeline.probabilities import softmax

    qhat = conformal_threshold(ckpt, 0.1)
    assert len(ckpt["conformal_scores"]) == read_json(work / paths.PREPARED_META)["counts"]["val"]
    assert read_json(work / paths.ONNX_META)["conformal_threshold"] == pytest.approx(min(qhat, 1.0), abs=1e-6)
    probs = softmax(scaled(predict_logits(model, x, preprocessing(ckpt)), temperature(ckpt)))
    sets = prediction_sets(probs, qhat)
    assert sets[np.arange(len(y)), y].mean() == pytest.approx(results["evaluate"]["coverage"])
    assert "coverage" in pd.read_csv(work / paths.PER_CLASS) and (work / paths.PREDICTION_SETS_PNG).stat().st_size > 0
    # the validation logits it keeps (evaluate's label issues take them) are the kept weights' own
    from pipeline.checkpoint import val_logits

    x_val, _ = load_split("val", work / paths.PREPARED_DIR)
    np.testing.assert_allclose(val_logits(ckpt), predict_logits(model, x_val, preprocessing(ckpt)), atol=1e-4)


def ckpt_arch(work) -> str:
    return load_checkpoint(work / paths.CHECKPOINT)[1]["arch"]


CURVES = ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "schedule/lr")


def test_one_mlflow_run_holds_everything(pipeline_run):
    work, uri, results = pipeline_run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("digits")  # mlflow.experiment: auto, named after the data set
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == read_json(work / paths.MLFLOW_RUN)["run_id"] == results["report"]["run_id"]
    assert not results["report"]["new_run"] and read_json(work / paths.MLFLOW_RUN)["complete"]
    assert run.data.params["lr"] == "0.003" and run.data.params["train.optimizer"] == "adamw"
    assert run.data.params["epochs"] == "2"
    assert run.data.tags["dataset"] == "digits" and run.data.tags["dvc_exp_name"] == "tiny-exp"
    assert run.info.run_name == "original · digits"  # not a git checkout: no params known to differ
    # a local store keeps artifacts under the repo root, wherever the stage ran from
    assert run.info.artifact_uri.startswith((work / "mlartifacts").as_uri())
    assert run.data.tags["strategy"] == "scratch" and run.data.tags["pretrained"] == "false"
    for curve in CURVES:
        assert [m.step for m in client.get_metric_history(run.info.run_id, curve)] == [1, 2], curve
    assert run.data.metrics["test/accuracy"] == pytest.approx(results["evaluate"]["accuracy"], abs=5e-5)  # 4 decimals
    # the charts hold the curves and the few figures runs are sorted by, test before train; every
    # other figure is in the description's tables; counts and timings are diagnostics
    assert {k.split("/")[0] for k in run.data.metrics} == {"accuracy", "loss", "schedule", "test", "train"}
    assert set(run.data.metrics) - set(CURVES) == {
        "test/accuracy", "test/balanced_accuracy", "test/f1_macro", "test/log_loss", "test/ece_calibrated",
        "test/coverage", "test/set_size_mean", "train/best_val_accuracy", "train/seconds"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.json", "predictions.csv", "learning_curves.png",
            "augmented_samples.png", "eval.json", "per_class.csv", "onnx", "misclassified.png", "gradcam.png",
            "report.md", "report.html", "train.json", "data_card.json", "data_card.md", "data_card_duplicates.png", "diagnostics"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")} == {"diagnostics/train.json"}
    # what the UI shows: a description with every figure, the data set as inputs, the model-training view
    note = run.data.tags["mlflow.note.content"]
    assert f"**{ckpt_arch(work)}** on **digits**" in note and "not a git checkout" in note, note
    for figure in ("| top-5 accuracy | ", "| expected calibration error after T | ",
                   f"| best epoch | {results['train']['best_epoch']} |", "| top-1 agreement with PyTorch | 1.0000 |"):
        assert figure in note, figure
    inputs = {i.dataset.name.split(" ")[0]: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"digits/train", "digits/val", "digits/test"}
    assert len(set(inputs.values())) == 3  # each split's digest is its own
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"].startswith("Image classification on **digits**")
    assert {"onnx/model.json", "onnx/export.json"} <= {a.path for a in client.list_artifacts(run.info.run_id, "onnx")}
    # the ONNX model itself is the run's logged model; nothing is registered by default
    assert [m.source_run_id for m in client.search_logged_models([exp.experiment_id])] == [run.info.run_id]
    assert client.search_registered_models() == []


def test_report_records_a_new_complete_run_when_train_did_not_run(pipeline_run, monkeypatch, capsys):
    """What `dvc exp run` meets when DVC skipped or restored train: the report stage runs alone.
    A run completed before is not reused (one run per execution): a new one holds the same
    params, curves (step = epoch), figures, files and model."""
    work, uri, results = pipeline_run
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "report-only")
    again = report.main()
    assert again["new_run"] and again["run_id"] != results["report"]["run_id"]
    client = MlflowClient(uri)
    first, second = (client.get_run(r["run_id"]) for r in (results["report"], again))
    assert second.info.status == "FINISHED" and second.info.run_name == first.info.run_name
    assert second.data.tags["dvc_exp_name"] == "report-only"
    assert second.data.tags["data_hash"] == first.data.tags["data_hash"] != ""  # train's, re-computed
    assert {k: v for k, v in second.data.params.items()} == first.data.params
    for curve in CURVES:
        assert [m.value for m in client.get_metric_history(second.info.run_id, curve)] == [
            m.value for m in client.get_metric_history(first.info.run_id, curve)], curve
    assert set(second.data.metrics) == set(first.data.metrics)  # train/seconds: train_timing.json is this model's
    assert second.data.metrics["test/accuracy"] == first.data.metrics["test/accuracy"]
    assert read_json(work / paths.MLFLOW_RUN)["run_id"] == second.info.run_id
    assert second.info.run_id in (work / paths.EVAL_REPORT_MD).read_text()  # the report names the run that exists
    out = capsys.readouterr().out
    assert "recording the run from its outputs" in out and second.info.run_id in out
    runs = client.search_runs([first.info.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([first.info.run_id, second.info.run_id])


def test_evaluate_confusion_pictures_and_report(pipeline_run):
    from PIL import Image

    work, _, results = pipeline_run
    n_test = results["evaluate"]["n_test"]
    assert len(pd.read_csv(work / paths.PREDICTIONS)) == n_test
    confusion = read_json(work / paths.CONFUSION_JSON)
    assert np.sum(confusion["matrix"]) == n_test
    assert np.sum(confusion["normalized"], axis=1) == pytest.approx(np.ones(10), abs=1e-5)
    for png in (paths.CONFUSION_PNG, paths.MISCLASSIFIED_PNG, paths.GRADCAM_PNG):
        with Image.open(work / png) as img:
            assert img.format == "PNG" and min(img.size) > 100, png
    report = (work / paths.EVAL_REPORT_MD).read_text()
    assert read_json(work / paths.MLFLOW_RUN)["run_id"] in report
    assert f"| accuracy | {results['evaluate']['accuracy']:.4f} |" in report
    assert "best epoch" in report  # the train summary from metrics/train.json
    for picture in ("learning_curves.png", "confusion_matrix.png", "misclassified.png", "gradcam.png",
                    "augmented_samples.png", "reliability.png", "activations.png", "filters.png", "embedding.png",
                    "label_issues.png"):
        assert f"]({picture})" in report, picture


def test_onnx_parity_is_checked_for_real(pipeline_run):
    work, _, _ = pipeline_run
    model, ckpt = load_checkpoint(work / paths.CHECKPOINT)
    prep = ckpt["preprocessing"]
    x, _ = load_split("test", work / paths.PREPARED_DIR)
    x_float = ((np.array(x, dtype=np.float32) / 255 - np.array(prep["mean"], np.float32)[:, None, None])
               / np.array(prep["std"], np.float32)[:, None, None]).astype(np.float32)
    torch_logits = predict_logits(model, x, preprocessing(ckpt)) / ckpt["temperature"]  # the graph divides by T
    assert ckpt["temperature"] != 1.0  # calibrated (train.calibrate: true), so the division is tested
    result = parity(torch_logits, onnx_logits(work / paths.ONNX_MODEL, x_float))
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-4
    # a model that differs (here: other weights) fails the check with a clear message
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = parity(predict_logits(model, x, preprocessing(ckpt)) / ckpt["temperature"],
                   onnx_logits(work / paths.ONNX_MODEL, x_float))
    with pytest.raises(UserError, match="ONNX export disagrees"):
        check_parity(other)


def test_metrics_by_hand_with_a_class_never_predicted():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 0, 1, 1])
    metrics, per_class, cm = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["precision_macro"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert metrics["recall_macro"] == pytest.approx((1 + 0.5 + 0) / 3)
    f1 = [2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5), 0]
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert per_class["support"].tolist() == [2, 2, 2]
    assert cm.tolist() == [[2, 0, 0], [1, 1, 0], [0, 2, 0]]


def test_missing_inputs_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run the train stage first"):
        load_checkpoint(paths.CHECKPOINT)
    paths.CHECKPOINT.parent.mkdir()
    paths.CHECKPOINT.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(paths.CHECKPOINT)
