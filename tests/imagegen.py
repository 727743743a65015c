"""Tiny generated image tasks for tests: each class is a colour + shape, so it is learnable."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200)]


def draw(cls: int, rng: np.random.Generator, size: int = 32, gray: bool = False) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 80, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c = COLORS[cls % len(COLORS)]
    jitter = tuple(int(np.clip(v + rng.integers(-30, 30), 0, 255)) for v in c)
    x0, y0 = (int(v) for v in rng.integers(0, size // 3, 2))
    x1, y1 = x0 + size // 2 + int(rng.integers(0, size // 4)), y0 + size // 2
    if cls % 2 == 0:
        d.rectangle([x0, y0, x1, y1], fill=jitter)
    else:
        d.ellipse([x0, y0, x1, y1], fill=jitter)
    return img.convert("L") if gray else img


def make_imagefolder(root: str, classes: int = 3, train: int = 8, test: int = 4,
                     unlabeled: int = 24, size: int = 32, seed: int = 0) -> str:
    """root/train/<class>/*.png, root/test/<class>/*.png, root/unlabeled/<sub>/*.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                draw(c, rng, size, gray=(i % 4 == 3)).save(os.path.join(d, f"{i}.png"))
    for i in range(unlabeled):
        d = os.path.join(root, "unlabeled", f"part{i % 2}")
        os.makedirs(d, exist_ok=True)
        draw(i % classes, rng, size).save(os.path.join(d, f"u{i}.jpg"))
    return root
