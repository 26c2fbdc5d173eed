"""k-fold cross-validation: the fold stages and the summary as DVC runs them (tiny digits,
1 epoch, 3 folds, a real SQLite MLflow store), with the test split moved away so that any
read of it fails."""
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import paths
from pipeline.crossval import fold_files
from pipeline.crossval.fold import assignments
from pipeline.errors import UserError
from pipeline.io import read_json
from pipeline.params import MAX_FOLDS, parse_params
from stages import check, crossval, crossval_summary, download, prepare
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
        records = [crossval.main(f) for f in range(MAX_FOLDS)]
        summary = crossval_summary.main()
        for f in test_files:
            f.with_suffix(".away").rename(f)
        yield work, uri, records, summary
    finally:
        mp.undo()


def test_k_folds_run_and_the_rest_are_unused(crossval_run):
    _, _, records, summary = crossval_run
    assert [r["used"] for r in records] == [True] * K + [False] * (MAX_FOLDS - K)
    assert summary["folds"] == K
    for name, stats in summary.items():
        if name == "folds":
            continue
        assert stats["per_fold"] == [r["metrics"][name] for r in records[:K]]
        assert stats["mean"] == pytest.approx(np.mean(stats["per_fold"]))
        assert stats["std"] == pytest.approx(np.std(stats["per_fold"], ddof=1))
    assert summary["accuracy"]["mean"] > 0.5  # 1 epoch at 16 px: it learns


def test_crossval_json_is_the_dvc_metric(crossval_run):
    work, _, _, summary = crossval_run
    assert read_json(work / paths.CROSSVAL_METRICS) == summary
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert str(paths.CROSSVAL_METRICS) in dvc["metrics"]
    assert dvc["stages"]["crossval"]["matrix"]["fold"] == list(range(MAX_FOLDS))
    assert [d for d in dvc["stages"]["crossval_summary"]["deps"] if d.startswith("metrics/")] == [
        str(f) for f in fold_files()]


def test_folds_partition_train_and_val_and_never_touch_test(crossval_run):
    work, _, records, _ = crossval_run
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
    for r in records[:K]:  # each fold scored exactly its held-out images, trained on the others
        assert r["n_held_out"] == (oof["fold"] == r["fold"]).sum()
        assert r["n_train"] + r["n_held_out"] == len(oof)
    labels = [str(c) for c in np.load(work / paths.PREPARED_DIR / "train_y.npy")]
    train_rows = oof[oof["split"] == "train"].sort_values("index")
    assert train_rows["label"].astype(str).tolist() == labels


def test_mlflow_parent_run_with_a_child_per_fold(crossval_run):
    _, uri, _, summary = crossval_run
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    parents = [r for r in runs if r.data.tags.get("crossval") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.metrics["crossval/accuracy_mean"] == pytest.approx(summary["accuracy"]["mean"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["crossval"] for r in children) == [f"fold {f}" for f in range(K)]
    for child in children:
        assert "held_out/accuracy" in child.data.metrics and "epoch/val/accuracy" in child.data.metrics


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
