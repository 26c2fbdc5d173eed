"""Every data set the pipeline knows, in one place: its name (the `dataset:` of params.yaml),
what it is, and how it is downloaded and read. `download` materialises a data set under
data/raw/; `load_source` turns it into a `Source` (candidate images + labels) for prepare.

Importing this module is cheap (params validation lists the names); the torchvision sets'
module, which imports torchvision, is imported only when one of them is used. Their files
(URLs, mirrors, md5s) are in `pipeline.data.tvsets.SPECS`, keyed by the same names
(tests/test_tvsets.py checks that the two agree)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import write_json

if TYPE_CHECKING:  # numpy and PIL: imported by the readers, not by params validation
    from pipeline.data.source import Source
    from pipeline.core.params import DataParams


@dataclass(frozen=True)
class DataSet:
    kind: str          # bundled | torchvision | folder: how it is downloaded and read
    description: str
    classes: int | None = None  # None: the folder's own


DATASETS: dict[str, DataSet] = {
    "digits": DataSet("bundled", "1,797 8×8 handwritten digits, 10 classes, bundled in scikit-learn: works offline", 10),
    "cifar10": DataSet("torchvision", "60,000 32×32 photos, 10 classes; downloaded, md5-verified", 10),
    "cifar100": DataSet("torchvision", "60,000 32×32 photos, 100 classes; downloaded, md5-verified", 100),
    "mnist": DataSet("torchvision", "70,000 28×28 grayscale digits, 10 classes; downloaded, md5-verified", 10),
    "fashion_mnist": DataSet("torchvision", "70,000 28×28 grayscale clothes, 10 classes; downloaded, md5-verified",
                             10),
    "folder": DataSet("folder", "your own images in class folders (data_dir)"),
}


def display_name(dataset: str, data_dir: str | Path) -> str:
    """What a person calls the data set in reports, run names and tables: its `dataset:` name,
    or for `folder` the folder's own name (data_dir=data/flowers → flowers)."""
    if DATASETS[dataset].kind != "folder":
        return dataset
    return Path(data_dir).resolve().name or str(data_dir)


def provenance(dataset: str, data_dir: str) -> dict:
    """The data set's name and where it came from (the data card's header): for a folder, its
    path as params.yaml gives it (the report is a DVC output: no machine's absolute path)."""
    return {"name": display_name(dataset, data_dir), "source": dataset,
            "path": data_dir if DATASETS[dataset].kind == "folder" else None}


def class_count(dataset: str, data_dir: Path, multilabel: DataParams | None = None) -> int:
    """How many classes `dataset` has, without reading an image (a folder: its class folders;
    with `multilabel`, the data params of task=multilabel: the labels its CSV names)."""
    if (known := DATASETS[dataset].classes) is not None:
        return known
    if multilabel is not None:
        from pipeline.data.labels_csv import label_count

        return label_count(_check_folder(data_dir), multilabel.labels_csv, multilabel.label_separator,
                           multilabel.classes)
    from pipeline.data.folder import class_names

    return len(class_names(_check_folder(data_dir)))


def _check_folder(data_dir: Path | None) -> Path:
    if data_dir is None or not data_dir.is_dir():
        raise UserError(f"data_dir={str(data_dir)!r} is not a folder; point data_dir at a folder of class "
                        "folders (root/<class>/*.jpg or root/train|val|test/<class>/*.jpg)")
    return data_dir


def download(dataset: str, raw_dir: Path = paths.RAW_DIR, data_dir: Path | None = None) -> Path:
    """Materialise `dataset` under `raw_dir`; return what was written. Idempotent.
    For `folder` nothing is downloaded: the user's `data_dir` is checked to exist."""
    kind = DATASETS[dataset].kind
    raw_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bundled":
        from pipeline.data import digits

        return digits.download(raw_dir)
    if kind == "folder":  # nothing to fetch; record where the images are (prepare depends on data_dir itself)
        target = raw_dir / "folder.json"
        write_json(target, {"dataset": "folder", "data_dir": str(_check_folder(data_dir).resolve())})
        return target
    from pipeline.data import tvsets

    return tvsets.download(dataset, raw_dir)


def load_source(dataset: str, raw_dir: Path = paths.RAW_DIR, data_dir: Path | None = None,
                multilabel: DataParams | None = None) -> Source:
    """The data set's candidate images and labels; with `multilabel` (the data params of
    task=multilabel), a folder's images and label sets from its labels CSV."""
    kind = DATASETS[dataset].kind
    if multilabel is not None:
        from pipeline.data.labels_csv import load_multilabel

        return load_multilabel(_check_folder(data_dir), multilabel.labels_csv, multilabel.label_separator,
                               multilabel.classes)
    if kind == "bundled":
        from pipeline.data import digits

        return digits.load_source(raw_dir)
    if kind == "folder":
        from pipeline.data.folder import scan_folder

        return scan_folder(Path(data_dir or "."))
    from pipeline.data import tvsets

    return tvsets.load_source(dataset, raw_dir)
