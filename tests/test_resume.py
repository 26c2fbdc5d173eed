"""Checkpoint/resume and determinism through the real train stage: SIGKILL mid-run, re-run,
and the result equals an uninterrupted run, bit for bit (CPU)."""
import json
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import run, set_params, train_until_checkpointed


def stage(project: Path, name: str) -> None:
    run(["python", "-m", f"stages.{name}"], project)


def outcome(project: Path) -> tuple[dict, pd.DataFrame, dict]:
    stage(project, "evaluate")
    history = pd.read_csv(project / "metrics/train_history.csv")
    weights = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    return json.loads((project / "metrics/eval.json").read_text()), history, weights


@pytest.fixture
def prepared(project: Path, first_stages) -> Path:
    set_params(project, epochs=5, image_size=16, **{"augment.hflip": True, "train.label_smoothing": 0.1})
    return first_stages(project)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(prepared: Path):
    stage(prepared, "train")
    assert not (prepared / "checkpoints/last.pt").exists()  # removed once training completes
    reference = outcome(prepared)

    proc = train_until_checkpointed(prepared)
    last = prepared / "checkpoints/last.pt"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and last.exists()
    epoch_done = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epoch_done < 5

    out = run(["python", "-m", "stages.train"], prepared).stdout
    assert f"resuming from checkpoints/last.pt after epoch {epoch_done}" in out
    resumed = outcome(prepared)
    assert resumed[0] == reference[0]
    pd.testing.assert_frame_equal(resumed[1], reference[1])
    for key, value in reference[2].items():
        assert torch.equal(resumed[2][key], value), key


@pytest.mark.slow
def test_changed_params_start_fresh(prepared: Path):
    proc = train_until_checkpointed(prepared)
    proc.kill()
    proc.wait()
    set_params(prepared, lr=0.001, epochs=1)
    out = run(["python", "-m", "stages.train"], prepared).stdout
    assert "made with other params, data or code; starting fresh" in out
    assert len(pd.read_csv(prepared / "metrics/train_history.csv")) == 1


def test_the_fingerprint_hashes_what_changes_training():
    """The resume fingerprint covers the train stage's declared params, less records: evaluate's
    or the plots' params, the MLflow experiment and the thread count keep a resume checkpoint."""
    from pipeline.core.params import parse_params
    from pipeline.training.run import fingerprint

    base = {"epochs": 3, "lr": 0.01}

    def fp(**changes):
        raw = {**base, **{k: v for k, v in changes.items() if "." not in k}}
        for key, value in changes.items():
            if "." in key:
                section, name = key.split(".")
                raw.setdefault(section, {})[name] = value
        return fingerprint(parse_params(raw, check_models=False), "data")

    same = fp()
    assert fp(**{"plots.smoothing": 0.3}) == same
    assert fp(**{"evaluate.tta": "hflip"}) == same
    assert fp(**{"mlflow.experiment": "elsewhere"}) == same and fp(**{"train.num_threads": 1}) == same
    assert fp(lr=0.02) != same and fp(**{"train.optimizer": "sgd"}) != same and fp(**{"data.split_seed": 1}) != same
