"""Row ranges of Parquet view tables: the unit of work of the distillation input.

A view table (the logits stage's parts, a ``distill.targets`` table) is cut into ranges of
about ``rows`` rows from the files' footers alone; each decode task reads one range and decodes
its views. The work is so cut by rows, not by bytes: a reader that cuts by bytes (Ray Data's
Parquet reader coalesces files into 8 MiB blocks) gives a 10-class table ~80k rows per block,
one decode task on one core for them, while a GPU student needs a whole node's cores.

A range is consecutive rows of one file: whole small row groups merged, or a piece of a large
one. Every piece of a row group reads the whole group, so a group is cut into no more pieces
than keeps that re-reading small next to decoding the piece's images (``READ_BYTES_PER_ROW``).

The distillation input reads short ranges (stripes) from many places of the table in each
decode call (:func:`call_items`, :func:`stripe_rows`), interleaved and shuffled as they decode
(:func:`decode_mixed`), so a table stored sorted by class still gives mixed batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import storage
from ktray.data import columns as C
from ktray.data.source_cache import keep_open
from ktray.data.sources import parse_source
from ktray.data.sources import read_ahead as sources_read_ahead
from ktray.errors import KtrayError

READ_BYTES_PER_ROW = 64 * 2**10
"""A piece of a row group has at least group bytes / this many rows: re-reading a 64 KiB
share of Parquet per row is small next to decoding the row's image (~2 ms)."""


def row_ranges(
    files: Sequence[str], rows: int, metas: Sequence[Groups] | None = None
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


@dataclass(frozen=True)
class Groups:
    """The row groups of one Parquet file, from its footer: the rows and bytes of each. The
    footer itself is not kept: pyarrow's parsed footers of a 1M-row table in 64-row groups
    took 107 MiB of the driver (10M rows: ~1 GiB), these arrays 0.25 MiB."""

    rows: np.ndarray
    """int64 ``[G]``: rows of each group."""
    bytes: np.ndarray
    """int64 ``[G]``: uncompressed bytes of each group."""

    @property
    def num_rows(self) -> int:
        return int(self.rows.sum())

    @property
    def num_row_groups(self) -> int:
        return len(self.rows)


def footers(files: Sequence[str]) -> list[Groups]:
    """The row groups of ``files`` (:class:`Groups`, from their Parquet footers), in order,
    read by a thread pool."""

    def read(uri: str) -> Groups:
        fs, path = storage.fs_and_path(uri)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        return Groups(
            np.array([g.num_rows for g in groups], np.int64),
            np.array([g.total_byte_size for g in groups], np.int64),
        )

    if len(files) <= 1:
        return [read(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(files))) as pool:
        return list(pool.map(read, files))


def parquet_group_rows(sources: Sequence[str], files: int = 4) -> int:
    """Rows per row group of the Parquet image files behind image ``sources``: the largest
    among the first ``files`` of them (:func:`footers` only), 0 when none is one (files, tar
    members and IDX rows are read one by one, or an IDX file whole once). A reader of one
    image of such a file reads its whole row group."""
    uris = list(dict.fromkeys(u for k, u, _ in map(parse_source, sources) if k == "parquet"))
    largest = 0
    for uri in uris[:files]:
        try:
            (groups,) = footers([uri])
        except (OSError, pa.ArrowException, KtrayError):
            continue  # unreadable: reported when its images load
        largest = max([largest, *groups.rows.tolist()])
    return largest


def _file_ranges(uri: str, meta: Groups, rows: int) -> list[dict]:
    out: list[dict] = []
    run: list[int] = []  # whole small groups waiting to be merged
    run_rows = 0
    for g, (n, size) in enumerate(zip(meta.rows.tolist(), meta.bytes.tolist())):
        if n == 0:
            continue
        if run and (n > rows or run_rows + n > rows):
            out.append(_range(uri, run[0], run[-1], 0, run_rows))
            run, run_rows = [], 0
        if n > rows:  # a large group: its own pieces
            piece = max(rows, math.ceil(size / READ_BYTES_PER_ROW))
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


MIN_STRIPE_ROWS = 32
"""Rows a stripe holds at least: each stripe read opens its file and parses its footer (64-row
stripes of a 1,000-class logits table read at 22 us a row here, 512-row ones at 16)."""


def stripe_rows(task: int, stripes: int, units: Sequence[int] = ()) -> int:
    """Rows per stripe of a decode call of ``task`` rows cut into ``stripes`` places:
    ``task // stripes``, but never fewer than ``MIN_STRIPE_ROWS`` or a unit that is read whole
    (``units``: a row group of the view table, the view rows of a row group of the images'
    Parquet files), for a stripe that cuts one reads it again for each piece; at most ``task``
    (one place a call)."""
    return max(1, min(task, max([task // max(1, stripes), MIN_STRIPE_ROWS, *units])))


def call_items(stripes: Sequence[dict], per_call: int, passes: int, seed) -> list[dict]:
    """Decode calls over ``passes`` passes: each pass every stripe once, in an order of its
    own drawn from ``seed``, ``per_call`` stripes a call: ``{"parts": [stripe, ...], "seed"}``
    (``seed``: the call's shuffle of its rows, :func:`decode_mixed`). Without ``seed``, fresh
    entropy. With ``per_call=1`` the order is the plain seeded order of the stripes."""
    order_rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng(None if seed is None else [int(seed), 1])
    items = []
    for _ in range(passes):
        order = order_rng.permutation(len(stripes))
        for i in range(0, len(order), per_call):
            parts = [stripes[j] for j in order[i : i + per_call]]
            items.append({"parts": parts, "seed": int(seed_rng.integers(2**31))})
    return items


def decode_mixed(tables: Iterable[pa.Table], decode, batch_rows: int, seed: int):
    """The rows of ``tables`` (one call's stripes) decoded ``batch_rows`` rows an output, every
    output holding rows of all the stripes: the stripes are interleaved (each row placed by how
    far into its stripe it is, with ``seed``'s jitter; a stripe's rows keep their order, so its
    images are read together and a row group of a Parquet image file stays in the reader's
    cache while it is used) and each output's rows shuffled. A table sorted by class gives
    blocks of many classes. Outputs stream as they decode (a call's outputs held back and sent
    at once made each actor wait on Ray Data's scheduling loop: 0.57 of the cores' decode rate
    at 64 px against 0.75). One table alone streams in its own order."""
    tables = [t for t in tables if t.num_rows]
    if len(tables) == 1:
        for i in range(0, tables[0].num_rows, batch_rows):
            yield decode(tables[0].slice(i, batch_rows))
        return
    if not tables:
        return
    rng = np.random.default_rng(seed)
    progress = np.concatenate([(np.arange(n) + rng.random(n)) / n for n in map(len, tables)])
    table = pa.concat_tables(tables).take(np.argsort(progress, kind="stable"))
    for i in range(0, table.num_rows, batch_rows):
        part = table.slice(i, batch_rows)
        yield decode(part.take(rng.permutation(part.num_rows)))


def read_ahead(stripe: pa.Table) -> pa.Table:
    """``stripe``, its images' files opened and their Parquet groups read ahead
    (:func:`ktray.data.sources.read_ahead`) in the thread that read it."""
    if C.SOURCE in stripe.column_names:
        sources_read_ahead(stripe.column(C.SOURCE).to_pylist())
    return stripe


READ_THREADS = 32
"""Stripes of a call read at once (``train.stripes`` 32 by default): on s3 each is a few round
trips, so a call's stripes all together take about as long as one."""


class ReadDecodeRanges:
    """Calls -> decoded views, ``batch_rows`` rows per output: reads the ranges (stripes) of
    each call of the input batch (a table of :func:`call_items` dicts), a thread each, and
    decodes them with ``decode`` (a :class:`ktray.data.decode.DecodeViews`) through
    :func:`decode_mixed`."""

    def __init__(self, columns: Sequence[str], decode, batch_rows: int):
        self.columns = list(columns)
        self.decode = decode
        self.batch_rows = int(batch_rows)

    def __call__(self, batch: pa.Table) -> Iterator[dict]:
        for item in batch.to_pylist():
            parts = item["parts"]
            if len(parts) == 1:
                tables: Iterable[pa.Table] = [read_range(parts[0], self.columns)]
                yield from decode_mixed(tables, self.decode, self.batch_rows, item["seed"])
                continue
            keep_open(3 * len(parts))  # two calls an actor, their stripes' files (and spare)
            with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(parts))) as pool:
                tables = pool.map(lambda r: read_ahead(read_range(r, self.columns)), parts)
                yield from decode_mixed(tables, self.decode, self.batch_rows, item["seed"])
