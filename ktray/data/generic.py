"""A generic out-of-domain image pool built offline from the photos bundled with scikit-image
and scikit-learn.

Random crops (area 10-100 %, random aspect, random flips) of about twenty natural photos give a
pool of varied natural-image patches: the "generic" transfer set that task-specific transfer
sets are compared against. It needs no network and is deterministic for a seed.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ktray.data import columns as C
from ktray.data.readers import make_image_table
from ktray.data.sources import clear_cache
from ktray.errors import KtrayError
from ktray.storage import atomic_local_path

log = logging.getLogger(__name__)

SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "coins",
    "clock",
    "moon",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "page",
    "text",
    "cell",
)
"""scikit-image images used when they load without a download (newer releases fetch some)."""

POOL_FILE = "generic_pool.parquet"
_ROWS_PER_GROUP = 1024


@functools.lru_cache(maxsize=1)
def offline_photos() -> tuple[Image.Image, ...]:
    """The bundled photos that load without network access, as RGB PIL images.

    Raises:
        KtrayError: Neither scikit-image nor scikit-learn provides any photo.
    """
    photos = []
    try:
        import skimage.data

        for name in SKIMAGE_PHOTOS:
            try:
                arr = getattr(skimage.data, name)()
            except Exception as e:  # noqa: BLE001 - pooch download needed, missing file, ...
                log.debug("skipping skimage.data.%s: %s", name, e)
                continue
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                continue
            photos.append(Image.fromarray(arr).convert("RGB"))
    except ImportError:
        log.debug("scikit-image is not installed")
    try:
        from sklearn.datasets import load_sample_images

        photos += [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]
    except Exception as e:  # noqa: BLE001
        log.debug("sklearn sample images unavailable: %s", e)
    if not photos:
        raise KtrayError(
            "no offline photos for the generic pool: install scikit-image or scikit-learn"
        )
    return tuple(photos)


def random_crop(
    photo: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.1, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """A random-resized crop of ``photo`` (area fraction in ``scale``), flipped at random."""
    w, h = photo.size
    for _ in range(10):
        area = rng.uniform(*scale) * w * h
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = math.sqrt(area * r), math.sqrt(area / r)
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(cw, w), min(ch, h)
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    out = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.1:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def pool_path(out_uri: str) -> str:
    """The Parquet file of a pool: ``out_uri`` itself if it ends in ``.parquet``, else
    ``out_uri/generic_pool.parquet``."""
    out_uri = str(out_uri)
    if "://" not in out_uri and "::" not in out_uri:
        out_uri = os.path.abspath(out_uri)  # sources must not depend on the working directory
    return out_uri if out_uri.endswith(".parquet") else f"{out_uri.rstrip('/')}/{POOL_FILE}"


def build_generic_pool(out_uri: str, n_images: int, size: int = 64, seed: int = 0) -> pa.Table:
    """Write ``n_images`` random crops of the offline photos as one Parquet file.

    The file has the img2dataset layout (``key: string``, ``png: binary``) and is written
    atomically (temporary name, then rename).

    Args:
        out_uri: Parquet file path/URI, or a folder (then ``generic_pool.parquet`` inside it).
        n_images: Number of crops (> 0).
        size: Side of the square crops in pixels.
        seed: Seed; the same seed gives byte-identical images.

    Returns:
        The image table (``image_id`` = key, ``source`` = ``file#row``, ``label`` = -1).
    """
    if n_images <= 0 or size <= 0:
        raise KtrayError(f"generic pool needs n_images > 0 and size > 0, got {n_images}, {size}")
    photos = offline_photos()
    rng = np.random.default_rng(seed)
    path = pool_path(out_uri)
    keys = [f"generic_{seed}_{i:07d}" for i in range(n_images)]
    schema = pa.schema(
        [("key", pa.string()), ("png", pa.binary())],
        metadata={"ktray.generic_pool": f"seed={seed} size={size} photos={len(photos)}"},
    )
    with atomic_local_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, n_images, _ROWS_PER_GROUP):
                chunk = keys[start : start + _ROWS_PER_GROUP]
                pngs = [
                    _png(random_crop(photos[int(rng.integers(len(photos)))], rng, size))
                    for _ in chunk
                ]
                writer.write_table(pa.table({"key": chunk, "png": pngs}, schema=schema))
    clear_cache()  # a handle cached on an earlier file at this path would serve stale rows
    log.info("wrote %d generic crops from %d photos to %s", n_images, len(photos), path)
    return make_image_table(
        keys, [f"{path}#{i}" for i in range(n_images)], [C.UNLABELED] * n_images
    )
