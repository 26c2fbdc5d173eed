"""Stage `prepare`: seeded stratified split, resize, train-split statistics, augmentation preview.

Reads params: dataset, image_size, seed, data, augment. Reads: data/raw/.
Writes: data/prepared/ ({split}_x.npy, {split}_y.npy, meta.json), metrics/augmented_samples.png.
Run: `dvc repro prepare`."""
import numpy as np
import torch

from pipeline import paths
from pipeline.augment import augment_batch
from pipeline.data import load_source, load_split, prepare
from pipeline.errors import run_cli
from pipeline.params import load_params
from pipeline.plots import image_grid


def main() -> dict:
    params = load_params()
    source = load_source(params.dataset, paths.RAW_DIR)
    meta = prepare(source, params.image_size, params.data.val_fraction, params.data.test_fraction,
                   params.seed, paths.PREPARED_DIR, progress=True)
    counts = meta["counts"]
    print(f"prepare: {len(meta['classes'])} classes, train/val/test = "
          f"{counts['train']}/{counts['val']}/{counts['test']} images at {params.image_size}px; "
          f"mean={np.round(meta['mean'], 4).tolist()} std={np.round(meta['std'], 4).tolist()}")

    # The same augmentation the train stage applies, on 32 training images, for a person to check.
    x, y = load_split("train", paths.PREPARED_DIR)
    n = min(32, len(y))
    gen = torch.Generator().manual_seed(params.seed)
    aug = augment_batch(torch.from_numpy(np.array(x[:n])), random_crop_on=params.augment.random_crop,
                        crop_padding=params.augment.crop_padding, hflip=params.augment.hflip, gen=gen)
    image_grid(aug.numpy(), [meta["classes"][i] for i in y[:n]], paths.AUGMENTED_SAMPLES_PNG,
               f"Augmented training samples (crop={params.augment.random_crop}, "
               f"pad={params.augment.crop_padding}, hflip={params.augment.hflip})")
    return meta


if __name__ == "__main__":
    run_cli(main)
