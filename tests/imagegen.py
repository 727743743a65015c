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


def make_imagefolder(
    root: str,
    classes: int = 3,
    train: int = 8,
    test: int = 4,
    unlabeled: int = 24,
    size: int = 32,
    seed: int = 0,
) -> str:
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


# Solid colours (class = colour) with a random patch of another colour: a task any model learns
# in a few steps, whose crops still differ (the patch), used where a test needs a known answer.
PURE = [(230, 30, 30), (30, 200, 40), (40, 60, 230)]


def colour_image(cls: int, rng: np.random.Generator, size: int = 16) -> Image.Image:
    """``size`` x ``size`` image of colour ``PURE[cls]`` (jittered) with a random grey patch."""
    c = tuple(int(np.clip(v + rng.integers(-25, 25), 0, 255)) for v in PURE[cls % len(PURE)])
    img = Image.new("RGB", (size, size), c)
    d = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
    w, h = (int(v) for v in rng.integers(2, size // 3 + 1, 2))
    g = int(rng.integers(0, 256))
    d.rectangle([x0, y0, x0 + w, y0 + h], fill=(g, g, g))
    return img


def make_colour_task(
    root: str,
    classes: int = 3,
    train: int = 6,
    test: int = 6,
    unlabeled: int = 48,
    size: int = 16,
    seed: int = 0,
    swap_test: bool = False,
) -> str:
    """An imagefolder task whose class is the image's colour.

    Unlabeled images ``unlabeled/u{i:04d}.png`` have colour ``i % classes``, so consecutive
    rows of the transfer set always differ in class: a target paired with a neighbour's row is
    always another class. With ``swap_test``, test folder ``class{c}`` holds colour
    ``(c + 1) % classes``: a model that learned the train split scores ~1 there and ~0 on test.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            colour = (c + 1) % classes if (split == "test" and swap_test) else c
            for i in range(n):
                colour_image(colour, rng, size).save(os.path.join(d, f"{i}.png"))
    d = os.path.join(root, "unlabeled")
    os.makedirs(d, exist_ok=True)
    for i in range(unlabeled):
        colour_image(i % classes, rng, size).save(os.path.join(d, f"u{i:04d}.png"))
    return root
