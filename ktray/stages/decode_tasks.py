"""The CPU decode tasks of the Ray Data inference passes (teacher logits, crop embeddings,
evaluation, ``ktray predict``): one shard (or block) of rows -> ``uint8`` pixels + the columns
the model actors need (:func:`ktray.stages.shards.decoded`).

Ray pickles these functions by reference, so a decode worker imports this module and what it
imports: nothing here, nor in those modules, imports torch (``tests/test_imports.py``). A decode
worker that imported torch with the stage modules paid ~1.3 s of CPU before its first image
and held ~880 MiB resident against ~400 MiB without it (this project's 2-core machine).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ktray.data import columns as C
from ktray.data.decode import VIEW_COLUMNS, decode_full, decode_labeled, decode_views
from ktray.retrieval.crops import CropScheme, decode_crops
from ktray.stages import shards


def logits_views(block: pa.Table, size: int) -> dict:
    """Logits pass: one shard's views as ``uint8 [N, size, size, 3]``."""
    pixels, ok = decode_views(block, size)
    cols = {
        k: block[k].to_numpy(zero_copy_only=False)
        for k in (*VIEW_COLUMNS, shards.SET, shards.SHARD)
    }
    return shards.decoded(cols, pixels, ok)


def crop_scheme(d: dict) -> CropScheme:
    """A :class:`CropScheme` from its ``as_dict`` form."""
    return CropScheme(**dict(d, scales=tuple(d["scales"])))


def embedding_crops(block: pa.Table, schemes: dict, size: int) -> dict:
    """Embedding pass: one shard's crops as ``uint8 [N, size, size, 3]``."""
    name = block[shards.SET][0].as_py()
    cols, pixels, ok = decode_crops(block, crop_scheme(schemes[name]), size)
    n = len(ok)
    cols[shards.SET] = [name] * n
    cols[shards.SHARD] = [block[shards.SHARD][0].as_py()] * n
    return shards.decoded(cols, pixels, ok)


def labeled_images(rows: pa.Table, size: int) -> dict:
    """Evaluation: a block of labeled rows as full-image ``uint8`` views + labels."""
    pixels, labels, ok = decode_labeled(rows, size)
    return {shards.PIXELS: pixels, C.LABEL: labels, shards.OK: np.asarray(ok, bool)}


WIDTH, HEIGHT = "width", "height"
"""Columns of :func:`full_images`: each image's own size (a segmentation mask is resized to it)."""


def full_images(block: pa.Table, size: int) -> dict:
    """Batch prediction: one shard's images as full-image ``uint8 [N, size, size, 3]`` views,
    with each image's own width and height."""
    pixels, ok, sizes = decode_full(block, size)
    cols = {
        k: block[k].to_numpy(zero_copy_only=False)
        for k in (C.IMAGE_ID, C.SOURCE, shards.SET, shards.SHARD)
    }
    cols[WIDTH], cols[HEIGHT] = sizes[:, 0], sizes[:, 1]
    return shards.decoded(cols, pixels, ok)
