"""Stage `prepare`: decode every image once, resize it to the preprocessing's stored size,
split (seeded, stratified), train-split statistics, manifest, data report.

Reads params: its `params:` in dvc.yaml (the split is seeded by data.split_seed, not by `seed`:
models trained with other seeds share one split, so they can be compared and ensembled). Reads: data/resolved/preprocessing.json (the check
stage's: the sizes and resize the weights ask for), data/raw/ (or data_dir for dataset=folder).
Writes: data/prepared/ ({split}_x.npy, {split}_y.npy, meta.json with the completed
preprocessing, manifest.csv), metrics/data_report.{json,md}. Run: `dvc repro prepare`."""
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.data.prepare import prepare
from pipeline.data.registry import load_source, provenance
from pipeline.data.report import data_report, summary_line, to_markdown
from pipeline.errors import UserError, run_cli
from pipeline.io import atomic_path, read_json, write_json
from pipeline.params import load_params
from pipeline.preprocess import Preprocessing


def main() -> dict:
    params = load_params(stage="prepare")
    if not paths.RESOLVED_PREPROCESSING.exists():
        raise UserError(f"{paths.RESOLVED_PREPROCESSING} is missing; run the check stage first (dvc repro check)")
    plan = Preprocessing.from_dict(read_json(paths.RESOLVED_PREPROCESSING))
    source = load_source(params.dataset, paths.RAW_DIR, Path(params.data_dir))
    meta = prepare(source, plan, params.data.val_fraction, params.data.test_fraction, params.data.split_seed,
                   paths.PREPARED_DIR, progress=True)
    manifest = pd.read_csv(paths.MANIFEST, keep_default_na=False, dtype=str)
    report = data_report(manifest, meta["classes"], source.notes, provenance(params.dataset, params.data_dir))
    write_json(paths.DATA_REPORT, report)
    with atomic_path(paths.DATA_REPORT_MD) as tmp:
        tmp.write_text(to_markdown(report, manifest))
    counts = meta["counts"]
    print(f"prepare: {report['dataset']['name']}, {len(meta['classes'])} classes, train/val/test = "
          f"{counts['train']}/{counts['val']}/{counts['test']} images stored at {plan.stored_size}px; train-split "
          f"mean={np.round(meta['mean'], 4).tolist()} std={np.round(meta['std'], 4).tolist()}")
    print(f"prepare: {summary_line(report)} (details: {paths.DATA_REPORT_MD})")
    return meta | {"report": report}


if __name__ == "__main__":
    run_cli(main)
