"""Row ranges of Parquet view tables: the unit of work of the distillation input.

A view table (the logits stage's parts, a ``distill.targets`` table) is cut into ranges of
about ``rows`` rows from the files' footers alone; each decode task reads one range and decodes
its views. The work is so cut by rows, not by bytes: a reader that cuts by bytes (Ray Data's
Parquet reader coalesces files into 8 MiB blocks) gives a 10-class table ~80k rows per block,
one decode task on one core for them, while a GPU student needs a whole node's cores.

A range is consecutive rows of one file: whole small row groups merged, or a piece of a large
one. Every piece of a row group reads the whole group, so a group is cut into no more pieces
than keeps that re-reading small next to decoding the piece's images (``READ_BYTES_PER_ROW``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from ktray import storage

READ_BYTES_PER_ROW = 64 * 2**10
"""A piece of a row group has at least group bytes / this many rows: re-reading a 64 KiB
share of Parquet per row is small next to decoding the row's image (~2 ms)."""


def row_ranges(
    files: Sequence[str], rows: int, metas: Sequence[pq.FileMetaData] | None = None
) -> list[dict]:
    """Ranges of about ``rows`` rows over ``files``, in file and row order:
    ``{"path", "first_group", "last_group", "offset", "rows"}`` = rows ``[offset, offset +
    rows)`` of row groups ``first_group..last_group`` of ``path`` read together. ``metas``:
    the files' footers when the caller has read them already (:func:`footers`)."""
    if rows < 1:
        raise ValueError(f"rows per range must be >= 1, got {rows}")
    if metas is None:
        metas = footers(files)
    elif len(metas) != len(files):
        raise ValueError(f"{len(metas)} footers for {len(files)} files")
    out: list[dict] = []
    for uri, meta in zip(files, metas):
        out.extend(_file_ranges(uri, meta, rows))
    return out


FOOTER_THREADS = 32
"""Footers read at once: on s3 each is a round trip or two (~30-50 ms), so 5,000 parts (10M
rows in the logits stage's 2,048-row parts) would take minutes one after another."""


def footers(files: Sequence[str]) -> list[pq.FileMetaData]:
    """The Parquet footers (metadata) of ``files``, in order, read by a thread pool."""

    def read(uri: str) -> pq.FileMetaData:
        fs, path = storage.fs_and_path(uri)
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata

    if len(files) <= 1:
        return [read(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(files))) as pool:
        return list(pool.map(read, files))


def _file_ranges(uri: str, meta: pq.FileMetaData, rows: int) -> list[dict]:
    out: list[dict] = []
    run: list[int] = []  # whole small groups waiting to be merged
    run_rows = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        n = group.num_rows
        if n == 0:
            continue
        if run and (n > rows or run_rows + n > rows):
            out.append(_range(uri, run[0], run[-1], 0, run_rows))
            run, run_rows = [], 0
        if n > rows:  # a large group: its own pieces
            piece = max(rows, math.ceil(group.total_byte_size / READ_BYTES_PER_ROW))
            pieces = max(1, round(n / piece))
            bounds = [n * k // pieces for k in range(pieces + 1)]
            out.extend(_range(uri, g, g, a, b - a) for a, b in zip(bounds, bounds[1:]))
            continue
        run.append(g)
        run_rows += n
    if run:
        out.append(_range(uri, run[0], run[-1], 0, run_rows))
    return out


def _range(path: str, first: int, last: int, offset: int, rows: int) -> dict:
    return {"path": path, "first_group": first, "last_group": last, "offset": offset, "rows": rows}


READ_BATCH_ROWS = 8192
"""Rows per record batch when a piece of a large row group is read: the piece's rows are kept,
the group is streamed past, never held (a 1M-row group of 1,000 float16 logits is ~2 GB)."""


def read_range(r: dict, columns: Sequence[str]) -> pa.Table:
    """The rows of one range (a dict of :func:`row_ranges`), ``columns`` only."""
    fs, path = storage.fs_and_path(r["path"])
    first, last = int(r["first_group"]), int(r["last_group"])
    offset, rows = int(r["offset"]), int(r["rows"])
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if first == last and rows < pf.metadata.row_group(first).num_rows:  # a piece
            return _read_piece(pf, first, offset, rows, list(columns))
        table = pf.read_row_groups(list(range(first, last + 1)), columns=list(columns))
    return table.slice(offset, rows)


def _read_piece(pf: pq.ParquetFile, group: int, offset: int, rows: int, columns) -> pa.Table:
    kept, start = [], 0
    for batch in pf.iter_batches(READ_BATCH_ROWS, row_groups=[group], columns=columns):
        end = start + batch.num_rows
        lo, hi = max(start, offset), min(end, offset + rows)
        if hi > lo:
            kept.append(batch.slice(lo - start, hi - lo))
        start = end
        if start >= offset + rows:
            break  # the rest of the group is not read
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    return pa.Table.from_batches(kept, schema=schema)


class ReadDecodeRanges:
    """Ranges -> decoded views, ``batch_rows`` rows per output: reads each range of the input
    batch (a table of :func:`row_ranges` dicts) and decodes it with ``decode`` (a
    :class:`ktray.data.datasets.DecodeViews`) in slices, yielding one output per slice."""

    def __init__(self, columns: Sequence[str], decode, batch_rows: int):
        self.columns = list(columns)
        self.decode = decode
        self.batch_rows = int(batch_rows)

    def __call__(self, batch: pa.Table) -> Iterator[dict]:
        for r in batch.to_pylist():
            table = read_range(r, self.columns)
            for i in range(0, table.num_rows, self.batch_rows):
                yield self.decode(table.slice(i, self.batch_rows))
