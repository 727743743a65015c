"""Decoding for Ray Data's CPU stages: rows -> ``uint8`` pixels (+ targets, labels).

:class:`DecodeViews` is the CPU half of the distillation input (Ray Data's decode actors, or
in-process in :class:`ktray.data.datasets.ViewStream`); :func:`decode_views`,
:func:`decode_labeled` and :func:`decode_full` are the decode tasks of the logits pass, of
evaluation and of batch prediction (``ktray.stages.decode_tasks``). This module, and what it
imports, stays free of torch: a decode worker process that imported torch paid ~1.3 s of CPU
and a few hundred MiB of resident memory for it, before its first row (measured on this
project's 2-core machine; ``tests/test_imports.py`` holds the line).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ktray.data import columns as C
from ktray.data.sources import load_images
from ktray.data.views import ViewParams, crop_view, sample_view
from ktray.errors import KtrayError

VIEW_COLUMNS = [C.IMAGE_ID, C.SOURCE, C.VIEW, *C.BOX, C.FLIP]
"""The columns of a view row (the logits pass's input)."""


def require_columns(table: pa.Table, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise KtrayError(f"{what} lacks column(s) {', '.join(missing)}")


def list_column_matrix(
    column: pa.ChunkedArray | pa.Array, name: str = "column", dtype=np.float32
) -> np.ndarray:
    """A list<float> column of equal-length lists as a ``[N, D]`` array of ``dtype``.

    Raises:
        KtrayError: Null rows or lists of different lengths.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype)
    if arr.null_count:
        raise KtrayError(f"{name} has {arr.null_count} null rows")
    flat = np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype)  # writable
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if flat.size != n * int(lengths[0]) or (lengths != lengths[0]).any():
        raise KtrayError(f"{name} holds lists of different lengths")
    return flat.reshape(n, -1)


def view_params(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The stored views of a view table: boxes ``[N, 4]`` (full image when the box columns are
    absent) and flips ``[N]``."""
    n = table.num_rows
    if C.BOX[0] in table.column_names:
        require_columns(table, C.BOX, "view table")
        boxes = np.stack([table.column(k).to_numpy().astype(np.float64) for k in C.BOX], 1)
    else:
        boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]]), (n, 1))
    flips = (
        np.asarray(table.column(C.FLIP).to_pylist(), dtype=bool)
        if C.FLIP in table.column_names
        else np.zeros(n, dtype=bool)
    )
    return boxes, flips


class DecodeViews:
    """View rows -> ``{"x": uint8 [B, S, S, 3], ..., target: float16 [B, D]}``.

    The CPU half of the distillation input: decodes each row's image, cuts its stored view
    and resizes it to every requested size (student ``x``; online teacher ``xt``). Targets
    travel with their rows as float16. Unreadable images are dropped (the batch shrinks).

    Args:
        sizes: Output column -> side in pixels, e.g. ``{"x": 32, "xt": 224}``.
        targets: List columns copied as float16 ``[B, D]`` (``logits`` / ``features``).
        fresh_scale: ``(lo, hi)``: ignore the stored views and cut a fresh random view of each
            row (area in ``[lo, hi]``, random flip) at every call, from fresh entropy: each
            epoch sees new views. Every size gets the same view (teacher and student agree).
    """

    def __init__(
        self,
        sizes: dict[str, int],
        targets: Sequence[str] = (),
        fresh_scale: tuple[float, float] | None = None,
    ):
        self.sizes = {k: int(v) for k, v in sizes.items()}
        self.targets = tuple(targets)
        self.fresh_scale = tuple(fresh_scale) if fresh_scale else None

    def views(self, batch: pa.Table) -> list[ViewParams]:
        """The view of each row: stored, or fresh (``fresh_scale``)."""
        if self.fresh_scale is not None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])  # new every call
            sources = batch.column(C.SOURCE).to_pylist()
            return [
                sample_view(seed, f"{i}:{s}", 0, self.fresh_scale) for i, s in enumerate(sources)
            ]
        boxes, flips = view_params(batch)
        return [ViewParams(*(float(v) for v in b), bool(f)) for b, f in zip(boxes, flips)]

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        require_columns(batch, (C.SOURCE, *self.targets), "view table")
        views = self.views(batch)
        images = load_images(batch.column(C.SOURCE).to_pylist())
        keep = [i for i, img in enumerate(images) if img is not None]
        out: dict[str, np.ndarray] = {}
        for name, size in self.sizes.items():
            pix = np.zeros((len(keep), size, size, 3), np.uint8)
            for j, i in enumerate(keep):
                pix[j] = np.asarray(crop_view(images[i], views[i], size))
            out[name] = pix
        for name in self.targets:
            out[name] = list_column_matrix(batch.column(name), name, np.float16)[keep]
        return out


def decode_views(rows: pa.Table, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The views of view rows as ``uint8 [N, size, size, 3]`` and a readable mask ``[N]``
    (unreadable images give zeros). Each image is decoded once for all its views."""
    cols = rows.select(VIEW_COLUMNS).to_pydict()
    sources = cols[C.SOURCE]
    unique = list(dict.fromkeys(sources))
    images = dict(zip(unique, load_images(unique)))
    pixels = np.zeros((len(sources), size, size, 3), np.uint8)
    ok = np.zeros(len(sources), bool)
    for i, source in enumerate(sources):
        img = images[source]
        if img is not None:
            view = ViewParams(*(cols[k][i] for k in C.BOX), bool(cols[C.FLIP][i]))
            pixels[i] = np.asarray(crop_view(img, view, size), np.uint8)
            ok[i] = True
    return pixels, ok


def decode_full(rows: pa.Table, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full images of rows (column ``source``) resized to ``uint8 [N, size, size, 3]``,
    a readable mask ``[N]`` and each image's own ``(width, height)`` as ``int32 [N, 2]``
    (zeros where unreadable)."""
    images = load_images(rows[C.SOURCE].to_pylist())
    pixels = np.zeros((len(images), size, size, 3), np.uint8)
    ok = np.zeros(len(images), bool)
    sizes = np.zeros((len(images), 2), np.int32)
    for i, img in enumerate(images):
        if img is not None:
            pixels[i] = np.asarray(crop_view(img, ViewParams.full(), size), np.uint8)
            ok[i] = True
            sizes[i] = img.size
    return pixels, ok, sizes


def decode_labeled(rows: pa.Table, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-image views of labeled rows as ``uint8 [N, size, size, 3]``, their labels and a
    readable mask (unreadable images are skipped, as the local loader skips them)."""
    pixels, ok, _ = decode_full(rows, size)
    return pixels, rows[C.LABEL].to_numpy(zero_copy_only=False).astype(np.int64), ok
