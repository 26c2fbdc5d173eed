"""k-fold cross-validation, run by the train stage before the model itself (tiny digits, 1
epoch, 3 folds, a real SQLite MLflow store), with the test split moved away so that any read of
it fails; with crossval off, no fold stage exists at all."""
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import read_json
from pipeline.core.params import MAX_FOLDS, load_params, parse_params
from pipeline.crossval import fold_file
from pipeline.crossval.fold import assignments, finished, run_folds
from stages import check, download, prepare, train
from tests.conftest import ROOT, TINY, set_params

K = 3


@pytest.fixture(scope="module")
def crossval_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cv")
    (work / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(work, **(TINY | {"epochs": 1, "crossval.folds": K}))
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    uri = f"sqlite:///{work / 'store.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        check.main()
        download.main()
        prepare.main()
        test_files = [work / paths.PREPARED_DIR / f"test_{a}.npy" for a in "xy"]
        for f in test_files:  # cross-validation must never read the test split
            f.rename(f.with_suffix(".away"))
        summary = train.main()
        for f in test_files:
            f.with_suffix(".away").rename(f)
        yield work, uri, summary
    finally:
        mp.undo()


@pytest.mark.slow
def test_k_folds_run_before_the_model_and_their_records_go(crossval_run):
    work, _, _ = crossval_run
    summary = read_json(work / paths.CROSSVAL_METRICS)
    assert summary["folds"] == K
    for name, stats in summary.items():
        if name == "folds":
            continue
        assert len(stats["per_fold"]) == K
        assert stats["mean"] == pytest.approx(np.mean(stats["per_fold"]))
        assert stats["std"] == pytest.approx(np.std(stats["per_fold"], ddof=1))
    assert summary["accuracy"]["mean"] > 0.5  # 1 epoch at 16 px: it learns
    assert (work / paths.CHECKPOINT).exists() and not (work / paths.CROSSVAL_RECORDS).exists()


def test_crossval_is_part_of_train_and_a_dvc_metric():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert str(paths.CROSSVAL_METRICS) in dvc["metrics"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["train"]["outs"]]
    assert {str(paths.CROSSVAL_METRICS), str(paths.OOF_PREDICTIONS)} <= set(outs)
    assert "crossval" in dvc["stages"]["train"]["params"]
    assert not [name for name in dvc["stages"] if "crossval" in name]  # off by default: no fold stage to list or run


@pytest.mark.slow
def test_folds_partition_train_and_val_and_never_touch_test(crossval_run):
    work, _, _ = crossval_run
    oof = pd.read_csv(work / paths.OOF_PREDICTIONS)
    n = {s: len(np.load(work / paths.PREPARED_DIR / f"{s}_y.npy")) for s in ("train", "val")}
    assert len(oof) == n["train"] + n["val"] and set(oof["split"]) == {"train", "val"}
    assert not oof.duplicated(["split", "index"]).any()
    for split in ("train", "val"):
        assert sorted(oof.loc[oof["split"] == split, "index"]) == list(range(n[split]))
    sizes = oof["fold"].value_counts().sort_index().tolist()
    assert len(sizes) == K and max(sizes) - min(sizes) <= 10  # stratified: about equal
    probs = oof.filter(like="p_").to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    labels = [str(c) for c in np.load(work / paths.PREPARED_DIR / "train_y.npy")]
    train_rows = oof[oof["split"] == "train"].sort_values("index")
    assert train_rows["label"].astype(str).tolist() == labels


def test_each_fold_is_a_run_nested_under_the_training_run(crossval_run):
    work, uri, _ = crossval_run
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    parent = client.get_run(read_json(work / paths.MLFLOW_RUN)["run_id"])
    summary = read_json(work / paths.CROSSVAL_METRICS)
    assert parent.data.metrics["crossval/accuracy_mean"] == pytest.approx(summary["accuracy"]["mean"], abs=5e-5)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["crossval"] for r in children) == [f"fold {f}" for f in range(K)]
    for child in children:
        assert "held_out/accuracy" in child.data.metrics and "accuracy/val" in child.data.metrics


@pytest.mark.slow
def test_an_interrupted_cross_validation_keeps_its_finished_folds(crossval_run, monkeypatch, capsys):
    """Fold records carry the training's fingerprint: the same training skips them, another
    (here: another lr) does not."""
    work, _, _ = crossval_run
    monkeypatch.chdir(work)
    params = load_params(stage="train")
    records = run_folds(params, "cpu")  # what a stage killed after its folds left behind
    assert [r["fold"] for r in records] == list(range(K)) and fold_file(K - 1).exists()
    capsys.readouterr()
    again = run_folds(params, "cpu")
    assert capsys.readouterr().out.count("finished earlier: kept") == K
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    set_params(work, lr=0.01)
    other = load_params(stage="train")
    from pipeline.training.run import setup

    assert finished(0, K, setup(other, "cpu").cfg.fingerprint) is None


def test_folds_param_is_off_or_two_to_max():
    for bad in (1, MAX_FOLDS + 1, -2):
        with pytest.raises(UserError, match="crossval.folds"):
            parse_params({"crossval": {"folds": bad}}, check_models=False)
    assert parse_params({"crossval": {"folds": 5}}, check_models=False).crossval.folds == 5


def test_a_class_smaller_than_k_is_one_line():
    y = np.array([0] * 10 + [1] * 2)
    with pytest.raises(UserError, match="class 'b' has only 2 .*use fewer folds"):
        assignments(y, 3, 0, ["a", "b"])
    folds = assignments(np.array([0] * 9 + [1] * 6), 3, 0, ["a", "b"])
    assert sorted(np.bincount(folds)) == [5, 5, 5]
