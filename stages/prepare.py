"""Stage `prepare`: decode every image once, resize, split (seeded, stratified), train-split
statistics, manifest, data report, augmentation preview.

Reads params: dataset, data_dir, image_size (and model, for image_size: auto), seed, data, augment. Reads: data/raw/ (or
data_dir for dataset=folder). Writes: data/prepared/ ({split}_x.npy, {split}_y.npy,
meta.json, manifest.csv), metrics/data_report.{json,md}, metrics/augmented_samples.png.
Run: `dvc repro prepare`."""
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import paths
from pipeline.augment import AugmentConfig, augment_batch
from pipeline.data import load_source, load_split, prepare
from pipeline.errors import run_cli
from pipeline.io import atomic_path, write_json
from pipeline.params import load_params
from pipeline.plots import image_grid
from pipeline.report import data_report, summary_line, to_markdown


def main() -> dict:
    params = load_params()
    source = load_source(params.dataset, paths.RAW_DIR, Path(params.data_dir))
    meta = prepare(source, params.size, params.data.val_fraction, params.data.test_fraction,
                   params.seed, paths.PREPARED_DIR, resize_policy=params.data.resize, progress=True)
    manifest = pd.read_csv(paths.MANIFEST, keep_default_na=False, dtype=str)
    report = data_report(manifest, meta["classes"], source.notes)
    write_json(paths.DATA_REPORT, report)
    with atomic_path(paths.DATA_REPORT_MD) as tmp:
        tmp.write_text(to_markdown(report, manifest))
    counts = meta["counts"]
    print(f"prepare: {params.dataset}, {len(meta['classes'])} classes, train/val/test = "
          f"{counts['train']}/{counts['val']}/{counts['test']} images at {params.size}px; "
          f"mean={np.round(meta['mean'], 4).tolist()} std={np.round(meta['std'], 4).tolist()}")
    print(f"prepare: {summary_line(report)} (details: {paths.DATA_REPORT_MD})")

    # The augmentation the train stage applies, on 32 training images, for a person to check.
    x, y = load_split("train", paths.PREPARED_DIR)
    n = min(32, len(y))
    aug = augment_batch(torch.from_numpy(np.array(x[:n])), AugmentConfig(**params.augment.model_dump()),
                        meta["mean"], torch.Generator().manual_seed(params.seed))
    on = ", ".join(f"{k}={v}" for k, v in params.augment.model_dump().items() if v)
    image_grid((aug.numpy() * 255).round().astype(np.uint8), [meta["classes"][i] for i in y[:n]],
               paths.AUGMENTED_SAMPLES_PNG, f"Augmented training samples ({on or 'no augmentation'})")
    return meta | {"report": report}


if __name__ == "__main__":
    run_cli(main)
