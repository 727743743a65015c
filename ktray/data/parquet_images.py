"""Images stored as rows of Parquet files (img2dataset layout, HF ``datasets`` exports).

A source ``URI#ROW`` names a row of a Parquet file of encoded image bytes. Rows are read a row
group at a time into the per-process cache (:mod:`ktray.data.source_cache`), in the caller's
thread: on s3 the file's read-ahead (5 MB blocks) serves the next groups of a file read in
order. A read holds its file's lock, not the cache's: the two decode calls of an actor read
groups of two files side by side (one group at a time a process before: 0.67 / 0.73 of local
disk against 0.71 / 0.76 at 50 ms round trips, ``benchmarks/s3_input_bench.py``, alternated).
(Reading the groups a batch needs side by side, each fetch thread with its own file and one
request a group, was slower in ``benchmarks/s3_input_bench.py``: 0.56 of local disk
against 0.71 at 50 ms round trips, 64-image groups; no better with 512-image groups.)
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray.data import source_cache as sc

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "bytes", "img")
"""Parquet columns holding encoded image bytes, in order of preference."""


def image_column(schema: pa.Schema) -> str | None:
    """The name of the encoded-image column in a Parquet schema, or None."""
    for name in IMAGE_COLUMNS:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return name
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return name
    return None


class ParquetHandle:
    """An open Parquet image file: its image column and each row group's first row.

    ``read_lock`` lets one thread at a time read through its file object (not thread-safe);
    :func:`load_parquet` holds it, not the cache's lock, while a group is read, so a read
    (a round trip or more on s3) holds up only readers of the same file."""

    def __init__(self, uri: str):
        self.read_lock = threading.Lock()
        self.closed = False
        self.file = sc.open_rb(uri)
        self.pf = pq.ParquetFile(self.file)
        self.column = image_column(self.pf.schema_arrow)
        md = self.pf.metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self.starts = np.cumsum([0] + sizes)

    def group(self, row: int) -> int:
        return bisect_right(self.starts, row) - 1

    def close(self) -> None:
        with self.read_lock:  # (evicted from the cache: after a read in progress)
            self.closed = True
            self.file.close()


def row_group_bytes(h: ParquetHandle, g: int) -> tuple[list, int]:
    """Row group ``g``'s encoded images (``None`` where null) and their bytes."""
    col = h.pf.read_row_group(g, columns=[h.column]).column(0).combine_chunks()
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    values = col.to_pylist()
    return values, sum(len(v) for v in values if v is not None) + 64 * len(values)


def _handle(uri: str) -> ParquetHandle:
    return sc.handle(("parquet", uri), lambda: ParquetHandle(uri))


def _group_values(uri: str, g: int) -> list:
    """Row group ``g``'s encoded images, from the cache or read (outside the cache's lock)."""
    key = ("parquet", uri, g)
    with sc.lock:
        values = sc.data_cache.peek(key)
    if values is not None:
        return values
    values, nbytes = sc.read_open(
        ("parquet", uri), lambda: ParquetHandle(uri), lambda h: row_group_bytes(h, g)
    )
    with sc.lock:
        sc.data_cache.put(key, values, nbytes)
    return values


def load_parquet(uri: str, frags: list[str]) -> list[tuple[Any, str | None]]:
    """The encoded bytes (or why not) of rows ``frags`` of Parquet image file ``uri``."""
    h = _handle(uri)
    if h.column is None:
        msg = f"no image column ({', '.join(IMAGE_COLUMNS)}) in {uri}"
        return [(None, msg)] * len(frags)
    encoded = []
    for frag in frags:
        row = int(frag) if frag.isdigit() else -1
        if not 0 <= row < h.starts[-1]:
            encoded.append((None, f"row {frag} out of range in {uri}"))
            continue
        g = h.group(row)
        data = _group_values(uri, g)[row - h.starts[g]]
        encoded.append((data, None if data is not None else f"row {row} of {uri} is null"))
    return encoded


READ_AHEAD_BYTES = 4 * 2**20
"""Bytes of row groups :func:`read_ahead` reads for one stripe at most."""


def read_ahead(uri: str, rows: list[int]) -> None:
    """Read into the cache the row groups that ``rows`` of ``uri`` fall in (a distill stripe's
    images, in the thread that read the stripe: a call's stripes side by side, before its
    decoding asks for them one after another), if together they hold at most
    :data:`READ_AHEAD_BYTES` (a file of huge groups is left to be read as decoding goes)."""
    h = _handle(uri)
    if h.column is None:
        return
    md = h.pf.metadata
    groups = sorted({h.group(r) for r in rows if 0 <= r < h.starts[-1]})
    if sum(md.row_group(g).total_byte_size for g in groups) > READ_AHEAD_BYTES:
        return
    for g in groups:
        _group_values(uri, g)
