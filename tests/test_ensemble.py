"""`pipeline ensemble`: weighted ensembles of checkpoints and DVC experiments, on tiny digits.

Real models (trained for 2 epochs here), real ONNX Runtime, real `pipeline predict`; the slow
test runs two `dvc exp run`s in a temporary git repo and ensembles them by name through the CLI."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.checkpoint import load_checkpoint, predict_logits, preprocessing, save_checkpoint
from pipeline.core.errors import UserError
from pipeline.core.io import files_sha256
from pipeline.core.params import AugmentParams, TrainParams
from pipeline.ensemble import run
from pipeline.ensemble.members import experiments
from pipeline.evaluation.metrics import evaluation_metrics
from pipeline.export.onnx import onnx_logits, read_onnx_metadata
from pipeline.export.predict import load_predictor, predict_files
from pipeline.models import build_model
from pipeline.prepared import load_preprocessing, load_split
from pipeline.probabilities import softmax
from pipeline.training.loop import TrainConfig, seed_everything, train
from tests.conftest import run as run_cmd
from tests.conftest import set_params

TEMPERATURES = {"a": 1.3, "b": 0.8}  # calibration the members carry: the ensemble must apply it


def save_like(path: Path, ckpt: dict, **changes) -> Path:
    c = ckpt | changes
    save_checkpoint(path, arch=c["arch"], arch_kwargs=c["arch_kwargs"], state_dict=c["state_dict"], classes=c["classes"],
                    prep=c["prep"] if "prep" in changes else preprocessing(c), params=c["params"], summary=c["summary"],
                    data_hash=c["data_hash"], temperature=c["temperature"])
    return path


def trained(prepared: Path, prep, seed: int, path: Path, temperature: float) -> Path:
    """A small CNN (width 8) trained for 2 epochs on digits at 16 px (a few seconds)."""
    seed_everything(seed)
    model = build_model("original", num_classes=10, width=8)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, seed=seed, augment=AugmentParams(random_crop=False),
                      train=TrainParams(num_threads=1))
    res = train(model, load_split("train", prepared), load_split("val", prepared), prep, cfg, progress=False)
    save_checkpoint(path, arch="original", arch_kwargs={"num_classes": 10, "width": 8}, state_dict=res.best_state,
                    classes=[str(i) for i in range(10)], prep=prep, params={"dataset": "digits"}, summary={},
                    data_hash=files_sha256(sorted(prepared.iterdir())), temperature=temperature)
    return path


@pytest.fixture(scope="module")
def members(prepared_digits, tmp_path_factory) -> dict[str, Path]:
    """a: trained with the data's mean/std; b: another seed, trained with mean 0.5 / std 0.25
    (the ensemble re-normalises its input); bad: a's weights with the head's rows rolled, so it
    is confidently wrong."""
    folder = tmp_path_factory.mktemp("members")
    prep = load_preprocessing(prepared_digits)
    a = trained(prepared_digits, prep, 0, folder / "a.pt", TEMPERATURES["a"])
    b = trained(prepared_digits, replace(prep, mean=(0.5,) * 3, std=(0.25,) * 3), 1, folder / "b.pt", TEMPERATURES["b"])
    ckpt = torch.load(a, weights_only=True)
    rolled = {k: v.roll(1, 0) if k.startswith("head.") else v for k, v in ckpt["state_dict"].items()}
    bad = save_like(folder / "bad.pt", ckpt, state_dict=rolled)
    return {"a": a, "b": b, "bad": bad}


def calibrated(path: Path, x: np.ndarray) -> np.ndarray:
    """The member's calibrated probabilities, computed here independently of pipeline.ensemble."""
    model, ckpt = load_checkpoint(path)
    return softmax(predict_logits(model, x, preprocessing(ckpt)).astype(np.float64) / ckpt["temperature"])


def ensemble(specs, prepared, out_dir: Path, weights="auto"):
    return run([str(s) for s in specs], weights, out_dir / "models/ensemble.onnx", out_dir / "metrics/ensemble.json",
               prepared, track=False)


@pytest.fixture(scope="module")
def pair(members, prepared_digits, tmp_path_factory):
    """a and b with weights 3:1, written into a folder of its own."""
    out = tmp_path_factory.mktemp("pair")
    return ensemble([members["a"], members["b"]], prepared_digits, out, "3,1"), out


def onnx_probabilities(out: Path, path_a: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's probabilities of stored images normalised with member 0's mean/std."""
    _, ckpt = load_checkpoint(path_a)
    return softmax(onnx_logits(out / "models/ensemble.onnx", preprocessing(ckpt).model_input(np.array(x))))


def test_an_ensemble_of_a_model_with_itself_is_the_model(members, prepared_digits, tmp_path):
    result = ensemble([members["a"], members["a"]], prepared_digits, tmp_path)
    x, y = load_split("test", prepared_digits)
    alone = calibrated(members["a"], x)
    assert result.weights.tolist() == [0.5, 0.5]  # auto: equal members keep equal weights
    np.testing.assert_allclose(result.probabilities, alone, atol=1e-6)
    assert result.report["ensemble"] == result.report["members"][0]["test"] == evaluation_metrics(y, alone, list("0123456789"))[0]
    raw = softmax(np.log(alone) * TEMPERATURES["a"])  # softmax(logits): the model without its temperature
    uncalibrated = evaluation_metrics(y, raw, list("0123456789"))[0]
    assert result.report["ensemble"]["log_loss"] != pytest.approx(uncalibrated["log_loss"], abs=1e-6)  # T was applied
    np.testing.assert_allclose(onnx_probabilities(tmp_path, members["a"], x), alone, atol=1e-5)


def test_given_weights_average_the_members_calibrated_probabilities(pair, members, prepared_digits):
    result, out = pair
    x, y = load_split("test", prepared_digits)
    p_a, p_b = calibrated(members["a"], x), calibrated(members["b"], x)
    assert np.abs(p_a - p_b).max() > 0.1  # two different models
    expected = 0.75 * p_a + 0.25 * p_b
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    # the ONNX model (input normalised with a's mean/std; b's re-normalised inside) gives the same
    np.testing.assert_allclose(onnx_probabilities(out, members["a"], x), expected, atol=1e-5)
    written = json.loads((out / "metrics/ensemble.json").read_text())
    assert written == json.loads(json.dumps(result.report))
    assert written["weights"] == [0.75, 0.25] and written["weights_from"] == "given (--weights)"
    assert written["ensemble"] == evaluation_metrics(y, expected, list("0123456789"))[0]
    assert [(m["name"], m["temperature"], m["weight"]) for m in written["members"]] == \
        [(str(members["a"]), 1.3, 0.75), (str(members["b"]), 0.8, 0.25)]
    assert written["members"][1]["test"] == evaluation_metrics(y, p_b, list("0123456789"))[0]
    assert written["onnx"]["top1_agreement"] == 1.0 and written["onnx"]["n_checked"] == len(y)


def test_pipeline_predict_runs_the_ensemble_model(pair, members, prepared_digits, tmp_path):
    result, out = pair
    card = json.loads((out / "models/ensemble.json").read_text())
    assert card["arch"] == "ensemble" and card["weights"] == [0.75, 0.25] and len(card["members"]) == 2
    assert card["mean"] == list(load_preprocessing(prepared_digits).mean) and card["members"][1]["mean"] == [0.5] * 3
    predictor = load_predictor(out / "models/ensemble.onnx")
    x, _ = load_split("test", prepared_digits)
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.array(x[i]).transpose(1, 2, 0)).save(files[-1])
    for i, (_, top, reason) in enumerate(predict_files(predictor, files, 1)):
        assert reason == "" and top[0][0] == str(result.probabilities[i].argmax())
        assert top[0][1] == pytest.approx(result.probabilities[i].max(), abs=1e-5)


def test_the_card_is_in_the_onnx_file_too(pair):
    import onnxruntime as ort

    _, out = pair
    sess = ort.InferenceSession(str(out / "models/ensemble.onnx"), providers=["CPUExecutionProvider"])
    assert read_onnx_metadata(sess.get_modelmeta().custom_metadata_map) == json.loads((out / "models/ensemble.json").read_text())


def test_a_failed_parity_check_writes_nothing(members, prepared_digits, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.ensemble.model.MAX_PROB_DIFF", 0.0)  # the real ~1e-7 difference now fails
    with pytest.raises(UserError, match="ONNX model disagrees with PyTorch"):
        ensemble([members["a"], members["b"]], prepared_digits, tmp_path, "1,1")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_auto_weights_go_to_the_good_model(members, prepared_digits, tmp_path):
    result = ensemble([members["bad"], members["a"]], prepared_digits, tmp_path)
    report = result.report
    assert report["members"][0]["test"]["accuracy"] < 0.2 and report["members"][1]["test"]["accuracy"] > 0.8
    assert result.weights[1] > 0.99 and result.weights.sum() == pytest.approx(1.0)
    assert report["weights_from"].startswith("auto")
    assert report["val_log_loss"] <= report["members"][1]["val_log_loss"] + 1e-9


def incompatible(members: dict, tmp_path: Path, case: str) -> tuple[list[str], str, str]:
    """(members, weights, what the error says) of one kind of mistake."""
    ckpt = torch.load(members["a"], weights_only=True)
    a = str(members["a"])
    if case == "classes":
        return [a, str(save_like(tmp_path / "c.pt", ckpt, classes=list("9876543210")))], "auto", "has classes"
    if case == "image_size":
        small = replace(preprocessing(ckpt), image_size=12)
        return [a, str(save_like(tmp_path / "s.pt", ckpt, prep=small))], "auto", "has image_size 12"
    if case == "data_hash":
        return [a, str(save_like(tmp_path / "h.pt", ckpt, data_hash="0" * 64))], "auto", "trained on other prepared data"
    if case == "weights_count":
        return [a, a], "1,2,3", "3 numbers for 2 members"
    if case == "negative_weight":
        return [a, a], "1,-1", "non-negative"
    if case == "one_member":
        return [a], "auto", "at least 2 members"
    if case == "missing_file":
        return [a, "models/nope.pt"], "auto", "no such file"
    return [a, "no-such-experiment"], "auto", "neither a checkpoint file nor a DVC experiment"


@pytest.mark.parametrize("case", ["classes", "image_size", "data_hash", "weights_count", "negative_weight",
                                  "one_member", "missing_file", "unknown_experiment"])
def test_mistakes_are_one_line_errors_that_write_nothing(members, prepared_digits, tmp_path, monkeypatch, case):
    (tmp_path / "ckpts").mkdir()
    specs, weights, says = incompatible(members, tmp_path / "ckpts", case)
    monkeypatch.chdir(tmp_path)  # not a git repository: no experiments
    with pytest.raises(UserError, match=says) as err:
        ensemble(specs, prepared_digits, tmp_path / "out", weights)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_cli_reports_a_mistake_in_one_line(members, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["ensemble", str(members["a"]), str(members["a"]), "--weights", "1,2,3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --weights '1,2,3' has 3 numbers")
    assert list(tmp_path.iterdir()) == []


def test_outside_git_there_are_no_experiments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert experiments() == {}


@pytest.mark.slow
def test_two_dvc_experiments_ensembled_by_name(project: Path):
    """Two experiments that differ only in `seed` (the ensemble people try first): `seed` does
    not seed the split (data.split_seed does), so the second does not re-prepare and both
    members share one prepared data set."""
    set_params(project, epochs=1)
    for name, seed in (("exp-a", "0"), ("exp-b", "1")):  # up to evaluate: export is not needed
        out = run_cmd(["dvc", "exp", "run", "-S", f"seed={seed}", "--name", name, "evaluate"], project).stdout
        if name == "exp-b":
            assert "Stage 'prepare' didn't change, skipping" in out and "Running stage 'train'" in out, out
    listed = run_cmd(["dvc", "exp", "list", "--all-commits", "--name-only"], project).stdout.split()
    assert sorted(listed) == ["exp-a", "exp-b"]
    proc = run_cmd(["python", "-m", "pipeline", "ensemble", "exp-a", "exp-b"], project)
    assert "ensemble" in proc.stdout and "exp-a" in proc.stdout
    report = json.loads((project / "metrics/ensemble.json").read_text())
    for member, name in zip(report["members"], ("exp-a", "exp-b")):
        ref = run_cmd(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"], project).stdout.strip()
        assert member["name"] == name and member["commit"] == ref
        recorded = json.loads(run_cmd(["git", "show", f"{ref}:metrics/eval.json"], project).stdout)
        assert member["test"]["accuracy"] == recorded["accuracy"]  # the experiment's own model was read
    assert report["members"][0]["test"] != report["members"][1]["test"]  # two models, not the workspace's twice
    assert sum(report["weights"]) == pytest.approx(1.0) and report["onnx"]["top1_agreement"] == 1.0
    image = project / "one.png"
    x, _ = load_split("test", project / "data/prepared")
    Image.fromarray(np.array(x[0]).transpose(1, 2, 0)).save(image)
    predicted = run_cmd(["python", "-m", "pipeline", "predict", "models/ensemble.onnx", str(image), "--json"], project)
    assert json.loads(predicted.stdout)["top_k"][0]["label"] in [str(i) for i in range(10)]
    unknown = run_cmd(["python", "-m", "pipeline", "ensemble", "exp-a", "exp-c"], project, check=False)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "experiments: exp-a, exp-b" in unknown.stderr
    # temporary files only outside the repository; an MLflow run "ensemble" with the test metrics
    assert not list(project.rglob("pipeline-ensemble-*")) and not list(project.glob("models/*.tmp*"))
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_experiments()],
        filter_string="attributes.run_name = 'ensemble'")
    assert len(runs) == 1 and runs[0].data.metrics["test/accuracy"] == pytest.approx(report["ensemble"]["accuracy"], abs=5e-5)
