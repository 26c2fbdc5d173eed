"""Stage `report`: the end of every pipeline run, whatever DVC skipped before it.

Completes this execution's MLflow run (train's, or a new one when DVC skipped or restored
train) with everything train, evaluate and export wrote, registers the ONNX model when
mlflow.register_model is set, writes metrics/report.md and report.html (which name that run;
not DVC outputs: they change every run), and prints the end-of-run block.

Reads params: its `params:` in dvc.yaml. Reads: models/ and metrics/ (what train, evaluate and export
wrote), data/prepared/ (split digests, an input example). Writes: models/report.json (what
was published: DVC-cached, not in git, so a fresh clone's first run publishes), and, not DVC
outputs, metrics/report.md, metrics/report.html, models/mlflow_run.json.
Run: `dvc repro report` (everything before it first)."""
from pipeline.core.errors import run_cli
from pipeline.core.params import load_params


def main() -> dict:
    from pipeline.publish import run

    return run(load_params(stage="report", check_models=False))


if __name__ == "__main__":
    run_cli(main)
