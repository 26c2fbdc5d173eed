"""Per-sample batch augmentation: each image its own crop, flip, affine, jitter and erased box;
switched off means identity."""
import torch
import torch.nn.functional as F

from pipeline.core.params import AugmentParams
from pipeline.core.preprocess import normalize
from pipeline.training.augment import (
    augment_batch,
    color_jitter,
    is_identity,
    random_affine,
    random_crop,
    random_erasing,
    random_hflip,
)

OFF = AugmentParams(random_crop=False, hflip=False)


def distinct_images(n: int = 64, size: int = 12) -> torch.Tensor:
    """n copies of one image whose every pixel is different, so any shift is visible."""
    img = (torch.arange(3 * size * size).reshape(3, size, size) % 250 + 3).to(torch.uint8)
    return img.expand(n, -1, -1, -1).clone()


def n_distinct(x: torch.Tensor) -> int:
    return len({tuple(o.flatten().tolist()) for o in x})


def test_crop_differs_per_sample_and_is_a_shift_of_the_padded_image():
    x, pad = distinct_images(), 3
    out = random_crop(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and n_distinct(out) > 10  # not one crop for the whole batch
    padded = F.pad(x[0], (pad, pad, pad, pad))
    windows = [padded[:, dy:dy + 12, dx:dx + 12] for dy in range(7) for dx in range(7)]
    for o in out:
        assert any(torch.equal(o, w) for w in windows)


def test_flip_is_per_sample():
    x = distinct_images()
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    kept = [torch.equal(o, x[0]) for o in out]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_affine_jitter_and_erasing_are_per_sample():
    x = distinct_images().float() / 255
    gen = torch.Generator().manual_seed(0)
    assert n_distinct(random_affine(x, 20, 0.1, gen)) == 64
    assert n_distinct(color_jitter(x, 0.3, gen)) == 64
    erased = random_erasing(x, 0.5, torch.tensor([-1.0, -1.0, -1.0]), gen)
    hit = (erased == -1).flatten(1).any(1)
    assert 10 < int(hit.sum()) < 54                     # about half the images get a box
    assert n_distinct(erased[hit]) == int(hit.sum())    # each its own box
    assert torch.equal(erased[~hit], x[~hit])


def test_affine_with_zero_range_is_identity():
    x = distinct_images(4).float() / 255
    assert torch.allclose(random_affine(x, 0, 0), x, atol=1e-5)


def test_switched_off_is_identity():
    x = distinct_images()
    assert is_identity(OFF)
    assert torch.equal(augment_batch(x, OFF, [0.5] * 3), x.float() / 255)
    no_pad = AugmentParams(random_crop=True, crop_padding=0)
    assert torch.equal(augment_batch(x, no_pad, [0.5] * 3), x.float() / 255)


def test_same_generator_same_augmentation():
    x = distinct_images()
    cfg = AugmentParams(random_crop=True, crop_padding=2, hflip=True, rotate_degrees=10, scale=0.1,
                        color_jitter=0.2, random_erasing=0.5)
    a = augment_batch(x, cfg, [0.5] * 3, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, [0.5] * 3, torch.Generator().manual_seed(5))
    c = augment_batch(x, cfg, [0.5] * 3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1


def test_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]).expand(2, 3))
    assert torch.allclose(normalize(x.float() / 255, [0.5] * 3, [0.25, 0.5, 1.0]), out)
