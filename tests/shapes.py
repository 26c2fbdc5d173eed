"""A small multi-label image folder for tests: each 32×32 picture holds one to three of four
planted shapes (its labels are the shapes it holds), some hold none; labels.csv beside them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "cross", "square", "triangle")


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    else:
        draw.line([x - r, y - r, x + r, y + r], fill=colour, width=2)
        draw.line([x - r, y + r, x + r, y - r], fill=colour, width=2)


def make_shapes(root: Path, n: int = 240, seed: int = 0, sep: str = ";", size: int = 32) -> Path:
    """`n` PNGs under root/images and root/labels.csv (path,labels); returns root."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    quadrants = [(8, 8), (24, 8), (8, 24), (24, 24)]
    for i in range(n):
        k = int(rng.choice([0, 1, 1, 2, 2, 3]))
        shapes = sorted(rng.choice(SHAPES, size=k, replace=False).tolist())
        background = tuple(int(v) for v in rng.integers(0, 60, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for shape, q in zip(shapes, rng.permutation(4)):
            cx, cy = quadrants[q]
            colour = tuple(int(v) for v in rng.integers(150, 256, 3))
            _draw(draw, shape, cx + int(rng.integers(-2, 3)), cy + int(rng.integers(-2, 3)), int(rng.integers(4, 7)),
                  colour)
        noise = rng.integers(-12, 13, (size, size, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        name = f"images/{i:04d}.png"
        Image.fromarray(pixels).save(root / name)
        rows.append(f"{name},{sep.join(shapes)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
