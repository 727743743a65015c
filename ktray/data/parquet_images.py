"""Images stored as rows of Parquet files (img2dataset layout, HF ``datasets`` exports).

A source ``URI#ROW`` names a row of a Parquet file of encoded image bytes. Rows are read a row
group at a time into the per-process cache (:mod:`ktray.data.source_cache`), in the caller's
thread: on s3 the file's read-ahead (5 MB blocks) serves the next groups of a file read in
order. (Reading the groups a batch needs side by side, each fetch thread with its own file and
one request a group, was slower in ``benchmarks/s3_input_bench.py``: 0.56 of local disk
against 0.71 at 50 ms round trips, 64-image groups; no better with 512-image groups.)
"""

from __future__ import annotations

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
    """An open Parquet image file: its image column and each row group's first row."""

    def __init__(self, uri: str):
        self.file = sc.open_rb(uri)
        self.pf = pq.ParquetFile(self.file)
        self.column = image_column(self.pf.schema_arrow)
        md = self.pf.metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self.starts = np.cumsum([0] + sizes)

    def group(self, row: int) -> int:
        return bisect_right(self.starts, row) - 1

    def close(self) -> None:
        self.file.close()


def row_group_bytes(h: ParquetHandle, g: int) -> tuple[list, int]:
    """Row group ``g``'s encoded images (``None`` where null) and their bytes."""
    col = h.pf.read_row_group(g, columns=[h.column]).column(0).combine_chunks()
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    values = col.to_pylist()
    return values, sum(len(v) for v in values if v is not None) + 64 * len(values)


def _handle(uri: str) -> ParquetHandle:
    return sc.handle_cache.get(("parquet", uri), lambda: (ParquetHandle(uri), 0))


def load_parquet(uri: str, frags: list[str]) -> list[tuple[Any, str | None]]:
    """The encoded bytes (or why not) of rows ``frags`` of Parquet image file ``uri``."""
    with sc.lock:
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
            values = sc.data_cache.get(("parquet", uri, g), lambda h=h, g=g: row_group_bytes(h, g))
            data = values[row - h.starts[g]]
            encoded.append((data, None if data is not None else f"row {row} of {uri} is null"))
    return encoded
