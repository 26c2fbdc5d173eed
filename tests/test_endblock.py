"""What a run says at its end: the result against the commit's, where the report is, the MLflow
run's address (opening the model-training view); evaluate's metrics as a small table."""
import json
from pathlib import Path

import pytest

from pipeline import endblock, runview
from pipeline.evaluation.run import metrics_table
from tests.conftest import run


def committed(repo: Path, dataset: str, accuracy: float) -> None:
    (repo / "metrics").mkdir(parents=True, exist_ok=True)
    (repo / "params.yaml").write_text(f"dataset: {dataset}\ndata_dir: data/flowers\n")
    (repo / "metrics/eval.json").write_text(json.dumps({"accuracy": accuracy}))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "results"]):
        run(cmd, repo)


WHO = runview.RunIdentity(experiment="digits", name="original · digits · lr=0.001", params={},
                          tags={"dataset": "digits", "model": "original", "strategy": "scratch"}, note="",
                          experiment_tags={})


def test_the_change_against_the_commit_of_the_same_data_set_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert endblock.committed_result("digits")[0] is None  # not a git repository yet
    committed(tmp_path, "digits", 0.9)
    assert endblock.committed_result("digits") == (0.9, "HEAD")
    assert endblock.change(0.95, 0.9, "HEAD") == "(committed 0.9000: +0.0500)"
    assert endblock.change(0.9, 0.9, "HEAD") == "(committed 0.9000: same)"
    assert endblock.committed_result("cifar10") == (None, "the commit is of digits")
    committed(tmp_path, "folder", 0.8)  # a folder data set is its folder's name
    assert endblock.committed_result("flowers")[0] == 0.8


def test_the_block_names_the_result_the_report_and_the_runs_addresses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    run_record = {"run_id": "abc123", "experiment": "digits", "experiment_id": "7",
                  "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    text = endblock.end_block({"accuracy": 0.98765}, WHO, run_record)
    lines = text.strip().splitlines()
    assert lines[0] == lines[-1] == endblock.RULE
    assert lines[1].startswith("original on digits (from scratch): test accuracy 0.9877 (")
    assert "metrics/report.html" in text and "the UI: mlflow ui" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs/abc123?workflowType=machine_learning" in text
    assert "#/experiments/7/runs?viewStateShareKey=best-first&workflowType=machine_learning" in text
    assert "python -m pipeline runs" in text and max(len(line) for line in lines[:3]) <= 100
    served = endblock.end_block({"accuracy": 0.9}, WHO, run_record | {"tracking_uri": "http://mlflow.example:5000"})
    assert "http://mlflow.example:5000/#/experiments/7/runs/abc123?" in served and "mlflow ui" not in served
    other_store = endblock.end_block({"accuracy": 0.9}, WHO, run_record | {"tracking_uri": "sqlite:////srv/m.db"})
    assert "mlflow ui --backend-store-uri sqlite:////srv/m.db" in other_store
    assert "MLflow   off" in endblock.end_block({"accuracy": 0.9}, WHO, None)


def test_evaluate_prints_its_metrics_as_a_small_aligned_table():
    metrics = {"accuracy": 0.9963, "balanced_accuracy": 0.99634, "top5_accuracy": 1.0, "log_loss": 0.0198,
               "n_test": 270}
    lines = metrics_table(metrics).splitlines()
    assert lines[0] == "evaluate: test split" and len(lines) == 4  # two name/value pairs a row
    assert lines[1].split() == ["accuracy", "0.9963", "balanced", "accuracy", "0.9963"]
    assert lines[1].index("0.9963") == lines[2].index("1.0000")  # the values line up
    assert "test images" in lines[3] and "270" in lines[3] and max(map(len, lines)) <= 80


@pytest.mark.parametrize("value, shown", [(0.94771241830065, 0.9477), (104.78378, 104.8), (1.0, 1.0)])
def test_headline_metrics_are_logged_tidy(value, shown):
    assert runview.test_metrics({"accuracy": value}) == {"test/accuracy": shown}


def test_the_clean_test_accuracy_is_shown_when_test_images_leaked():
    evaluation = {"accuracy": 0.8, "accuracy_clean": 0.75, "test_images_clean": 1200, "test_images_leaked": 34}
    lines = endblock.end_block(evaluation, WHO, None).splitlines()
    assert lines[3] == ("  clean    test accuracy 0.7500 on the 1,200 test images with no near-duplicate in train/val "
                        "(34 have one: metrics/data_card.md)")
    assert not any(line.startswith("  clean") for line in endblock.end_block({"accuracy": 0.8}, WHO, None).splitlines())
