"""The second offline task of the README's seed comparison: scikit-learn's 1,797 handwritten
digits (8x8) as an image folder of 32x32 PNGs, 80/20 train/test (``train_test_split``,
``random_state=0``: 1,437 / 360). Usage:

    python benchmarks/digits_task.py DIR
    ktray run imagefolder_cpu data.root=DIR data.labels_per_class=10 student.img_size=32 \
        seeds=3 "methods=[teacher,scratch,features@in_domain,task@in_domain]" out=OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="output folder (train/<digit>/*.png, test/<digit>/*.png)")
    root = Path(ap.parse_args().root)
    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=0.2, random_state=0)
    for split, ids in (("train", train), ("test", test)):
        for i in ids:
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            image = Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB")
            path = root / split / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    print(f"{root}: {len(train)} train, {len(test)} test images")


if __name__ == "__main__":
    main()
