"""Small image files for the data tests: random images, a class-folder tree, broken files."""

import io

import numpy as np
from PIL import Image


def image(i: int, mode: str = "RGB", size: int = 32) -> Image.Image:
    rng = np.random.default_rng(i)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = encode(image(99), "JPEG")
    return data[: len(data) // 2]


def make_folder(tmp_path):
    """root/{train,test}/{cat,dog}/ with RGB and grayscale PNG / JPEG files."""
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                mode = "L" if i == 0 else "RGB"
                ext = ("png", "JPG")[i % 2]
                image(10 * c + i, mode).save(
                    d / f"{i}.{ext}", format="PNG" if ext == "png" else "JPEG"
                )
            (d / "notes.txt").write_text("not an image")
    return root


def make_bad_files(tmp_path):
    d = tmp_path / "bad"
    (d / "sub").mkdir(parents=True)
    image(1).save(d / "good.png")
    (d / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    (d / "sub" / "truncated.jpg").write_bytes(truncated_jpeg())
    return d
