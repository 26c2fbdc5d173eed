"""Stage `prepare`: decode every image once, resize it to the preprocessing's stored size,
find duplicates, split (seeded, stratified, groups whole), train-split statistics, manifest, data card.

Reads params: its `params:` in dvc.yaml (the split is seeded by data.split_seed, not by `seed`:
models trained with other seeds share one split, so they can be compared and ensembled). Reads: data/resolved/preprocessing.json (the check
stage's: the sizes and resize the weights ask for), data/raw/ (or data_dir for dataset=folder).
Writes: data/prepared/ ({split}_x.npy, {split}_y.npy, meta.json with the completed
preprocessing, manifest.csv, duplicates.csv, {split}_group.npy), metrics/data_card.{json,md} and
metrics/data_card_duplicates.png. Run: `dvc repro prepare`."""
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import paths
from pipeline.core.errors import UserError, run_cli
from pipeline.core.io import atomic_path, read_json, write_json
from pipeline.core.params import load_params
from pipeline.core.preprocess import Preprocessing
from pipeline.data.card import data_card, duplicates_figure, leakage_line, summary_line, to_markdown
from pipeline.data.prepare import prepare
from pipeline.data.registry import load_source, provenance
from pipeline.plots import note_figure


def main() -> dict:
    params = load_params(stage="prepare")
    if not paths.RESOLVED_PREPROCESSING.exists():
        raise UserError(f"{paths.RESOLVED_PREPROCESSING} is missing; run the check stage first (dvc repro check)")
    plan = Preprocessing.from_dict(read_json(paths.RESOLVED_PREPROCESSING))
    source = load_source(params.dataset, paths.RAW_DIR, Path(params.data_dir),
                         params.data if params.task == "multilabel" else None)
    meta = prepare(source, plan, params.data, paths.PREPARED_DIR, progress=True)
    manifest = pd.read_csv(paths.MANIFEST, keep_default_na=False, dtype=str)
    pairs = pd.read_csv(paths.DUPLICATES, keep_default_na=False, dtype={"similarity": float})
    about = provenance(params.dataset, params.data_dir) | {"hash": meta["content_hash"]}
    card = data_card(manifest, meta["classes"], source.notes, about, pairs, meta, params.data)
    write_json(paths.DATA_CARD, card)
    if not duplicates_figure(pairs, manifest, paths.PREPARED_DIR, paths.DATA_CARD_PNG, params.data.duplicate_threshold):
        note_figure(f"No duplicate images found (data.duplicate_threshold={params.data.duplicate_threshold:g}; "
                    f"details: {paths.DATA_CARD_MD})", paths.DATA_CARD_PNG)
    with atomic_path(paths.DATA_CARD_MD) as tmp:
        tmp.write_text(to_markdown(card, manifest))
    counts = meta["counts"]
    print(f"prepare: {card['dataset']['name']}, {len(meta['classes'])} classes, train/val/test = "
          f"{counts['train']}/{counts['val']}/{counts['test']} images stored at {plan.stored_size}px; train-split "
          f"mean={np.round(meta['mean'], 4).tolist()} std={np.round(meta['std'], 4).tolist()}")
    print(f"prepare: {summary_line(card)} (details: {paths.DATA_CARD_MD})")
    if loud := leakage_line(card):
        print(f"prepare: {loud}")
    return meta | {"card": card}


if __name__ == "__main__":
    run_cli(main)
