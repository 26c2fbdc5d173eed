"""Per-sample batch augmentation: each image its own crop and flip; off means identity."""
import torch
import torch.nn.functional as F

from pipeline.augment import augment_batch, normalize, random_crop, random_hflip


def distinct_images(n: int = 64, size: int = 12) -> torch.Tensor:
    """n copies of one image whose every pixel is different, so any shift is visible."""
    img = torch.arange(3 * size * size, dtype=torch.int32).reshape(3, size, size) + 1
    return img.expand(n, -1, -1, -1).clone()


def test_crop_differs_per_sample_and_is_a_shift_of_the_padded_image():
    x, pad = distinct_images(), 3
    out = random_crop(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert len({tuple(o.flatten().tolist()) for o in out}) > 10  # not one crop for the whole batch
    padded = F.pad(x[0], (pad, pad, pad, pad))
    windows = {(dy, dx): padded[:, dy:dy + 12, dx:dx + 12] for dy in range(7) for dx in range(7)}
    for o in out:
        assert any(torch.equal(o, w) for w in windows.values())


def test_flip_is_per_sample():
    x = distinct_images()
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, x[0].flip(-1)) for o in out]
    kept = [torch.equal(o, x[0]) for o in out]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_switched_off_is_identity():
    x = distinct_images()
    assert torch.equal(augment_batch(x, random_crop_on=False, crop_padding=4, hflip=False), x)
    assert torch.equal(augment_batch(x, random_crop_on=True, crop_padding=0, hflip=False), x)


def test_same_generator_same_augmentation():
    x = distinct_images()
    kw = dict(random_crop_on=True, crop_padding=2, hflip=True)
    a = augment_batch(x, gen=torch.Generator().manual_seed(5), **kw)
    b = augment_batch(x, gen=torch.Generator().manual_seed(5), **kw)
    c = augment_batch(x, gen=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]).expand(2, 3))
