"""An image file → RGB pixels at the stored size: the decoding and resizing that prepare
applies to every image of a folder data set and `pipeline predict` to every file it is given
(one implementation, so a prediction sees exactly what training saw)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


class BadImage(Exception):
    """An item that cannot be used (corrupt, truncated, not an image, unreadable). The message
    is the reason shown in the manifest and the data card, e.g. 'truncated image'."""


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize(image: Image.Image | np.ndarray, size: int, policy: str = "center_crop",
           interpolation: str = "bilinear") -> np.ndarray:
    """RGB image of any size → size×size×3 uint8. `center_crop`: scale the shorter side to
    `size`, crop the centre; `stretch`: scale each side to `size` (aspect ratio not kept).
    Antialiased when shrinking (Pillow's resize filters scale their support)."""
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (size, size):
            return image
        image = Image.fromarray(image)
    if image.size != (size, size):
        if policy == "stretch":
            image = image.resize((size, size), _FILTERS[interpolation], reducing_gap=3.0)
        else:
            image = ImageOps.fit(image, (size, size), _FILTERS[interpolation])
    return np.asarray(image, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB, correctly: alpha composited on white (not dropped into whatever
    colour the transparent pixels hold), 16/32-bit grayscale scaled by its range (not clipped),
    CMYK and palettes through Pillow's own conversions."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16) >> 8  # 0..65535 → 0..255
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "I":  # 32-bit ints: PNG stores 16-bit grayscale this way in some Pillow versions
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if arr.max() > 255 else 255
        return Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def decode_image(path: Path, size_hint: int) -> Image.Image:
    """Open, fully decode (so truncation shows here) and convert one file to RGB.
    Raises `BadImage(reason)` for anything that is not a usable image, and for an image of more
    pixels than Pillow's `Image.MAX_IMAGE_PIXELS` (a decompression bomb): Pillow only warns up
    to twice the limit; here the limit is the limit, for prepare and predict alike."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(path, size_hint)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"decompression bomb (more pixels than the limit, {Image.MAX_IMAGE_PIXELS:,}); "
                       "resize it to fewer pixels") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (cannot identify)") from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise BadImage("truncated image") from None
        raise BadImage(f"unreadable: {exc.strerror or exc}") from None
    except (SyntaxError, ValueError) as exc:  # Pillow raises these for some broken headers
        raise BadImage(f"corrupt image: {exc}") from None


def _decode(path: Path, size_hint: int) -> Image.Image:
    """The RGB image; its `info["source"]` is the file's own (width, height, mode)."""
    with Image.open(path) as img:
        own = (*img.size, img.mode)
        if img.format == "JPEG" and size_hint:
            img.draft("RGB", (size_hint, size_hint))  # DCT scaling: decode big JPEGs at ≥ size_hint
        img.load()
        if img.format != "JPEG" or "exif" in img.info:  # a JPEG's orientation lives in its EXIF block
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
        rgb.info["source"] = own
        return rgb
