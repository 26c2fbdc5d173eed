"""Stage `download`: materialise the raw data set under data/raw/.

Reads params: its `params:` in dvc.yaml. Writes: data/raw/. Run: `dvc repro download`."""
from pathlib import Path

from pipeline.core import paths
from pipeline.core.errors import run_cli
from pipeline.core.params import load_params
from pipeline.data.registry import download


def main() -> None:
    params = load_params(stage="download")
    path = download(params.dataset, paths.RAW_DIR, Path(params.data_dir))
    print(f"download: {params.dataset} → {path}")


if __name__ == "__main__":
    run_cli(main)
