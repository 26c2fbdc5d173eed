"""Stage `check`: validate params.yaml and resolve what the weights bring, before any other
stage touches its outputs.

DVC removes a stage's outputs before it runs the stage's command, so a mistake found by the
stage itself comes too late. This stage runs before prepare whenever params.yaml (the whole file:
also a key no stage lists, such as a typo), the code, the weights file or the data folder
changed, and writes only when everything is valid (its outputs are `persist`: DVC never removes them),
so a bad value stops the pipeline here with one line. When nothing changed, it does not run.

Reads params: all of params.yaml; the weights file (our checkpoint's recorded preprocessing);
data_dir (dataset=folder: its class folders and image files, listed, not decoded; the
downloaded sets: data/raw, after download); the ImageNet weights of `pretrained: true` (in the
hub's cache, or downloaded into it here). Writes data/resolved/preprocessing.json (the
preprocessing the weights bring, or the data set's own: prepare depends on it) and
data/resolved/weights (a link to the weights file, or a line saying there is none: DVC hashes
what it points to, so train re-runs when the file's bytes change).
Run: `dvc repro check`."""
from pipeline.check import check
from pipeline.core.errors import run_cli
from pipeline.core.params import load_params


def main() -> dict:
    return check(load_params(stage="check"))


if __name__ == "__main__":
    run_cli(main)
