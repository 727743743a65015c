"""Segmentation data given as Parquet (``data.kind=segparquet``): one row per labeled image,
its encoded image bytes in an image column (``jpg``, ``png``, ``image``, ... as for
classification Parquet, HF ``{bytes, path}`` structs too) and its mask's PNG bytes in
``data.mask_column`` (no ray, no Config here).

A mask stored in a Parquet row is addressed by the string ``URI#ROW:COLUMN`` (the segmentation
table's ``mask`` column), so later stages, on any node, read the same cell. Cells are read one
Parquet row group at a time, grouped by file.
"""

from __future__ import annotations

import io
import re
from bisect import bisect_right
from collections import defaultdict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ktray.data import columns as C
from ktray.data.listing import expand_files
from ktray.data.packed import read_parquet_images
from ktray.data.sources import image_column, parse_source
from ktray.errors import KtrayError

_REF_RE = re.compile(r"^(?P<uri>.+\.(?:parquet|parq|pq))#(?P<row>\d+):(?P<column>.+)$")


def mask_ref(uri: str, row: int, column: str) -> str:
    """The mask string of row ``row`` of the Parquet file ``uri``, column ``column``."""
    return f"{uri}#{int(row)}:{column}"


def parse_mask_ref(ref: str) -> tuple[str, int, str] | None:
    """``(file, row, column)`` of a Parquet mask string, or None for a mask file."""
    m = _REF_RE.match(ref)
    return (m["uri"], int(m["row"]), m["column"]) if m else None


def describe(ref: str) -> str:
    """A mask string as users read it: ``FILE row N (column 'mask')`` or the file itself."""
    p = parse_mask_ref(ref)
    return f"{p[0]} row {p[1]} (column {p[2]!r})" if p else ref


def _bytes_column(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def read_cells(refs: list[tuple[str, int, str]]) -> list[bytes | None]:
    """The bytes of ``(file, row, column)`` cells (None where null), one row group at a time.

    Raises:
        KtrayError: An unreadable file, a missing column or a row out of range (named).
    """
    out: list[bytes | None] = [None] * len(refs)
    groups: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for i, (uri, row, column) in enumerate(refs):
        groups[(uri, column)].append((i, row))
    for (uri, column), items in groups.items():
        fs, path = fsspec.core.url_to_fs(uri)
        try:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                if column not in pf.schema_arrow.names:
                    raise KtrayError(f"no column {column!r} in {uri}")
                md = pf.metadata
                starts = np.cumsum(
                    [0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                )
                by_group: dict[int, list[tuple[int, int]]] = defaultdict(list)
                for i, row in items:
                    if not 0 <= row < starts[-1]:
                        raise KtrayError(f"row {row} out of range in {uri} ({starts[-1]} rows)")
                    by_group[bisect_right(starts, row) - 1].append((i, row))
                for g, rows in by_group.items():
                    col = pf.read_row_group(g, columns=[column]).column(0).combine_chunks()
                    if pa.types.is_struct(col.type):
                        col = col.field("bytes")
                    for i, row in rows:
                        out[i] = col[row - int(starts[g])].as_py()
        except (OSError, pa.ArrowException) as e:
            raise KtrayError(f"cannot read parquet file {uri}: {type(e).__name__}: {e}") from None
    return out


def read_masks_bytes(refs: list[str]) -> list[bytes | None]:
    """The PNG bytes of Parquet mask strings (``URI#ROW:COLUMN``)."""
    parsed = [parse_mask_ref(r) for r in refs]
    bad = [r for r, p in zip(refs, parsed) if p is None]
    if bad:
        raise KtrayError(f"not a Parquet mask string (URI#ROW:COLUMN): {bad[0]}")
    return read_cells(parsed)


def image_sizes(sources: list[str]) -> list[tuple[int, int] | None]:
    """``(width, height)`` of Parquet image sources (``URI#ROW``) from their headers; None for
    any other kind of source (the caller reads those)."""
    refs, where = [], []
    for k, src in enumerate(sources):
        kind, uri, frag = parse_source(src)
        if kind == "parquet" and frag.isdigit():
            refs.append((uri, int(frag), _image_column(uri)))
            where.append(k)
    out: list[tuple[int, int] | None] = [None] * len(sources)
    for k, data in zip(where, read_cells(refs)):
        if data is None:
            raise KtrayError(f"image {sources[k]} is null")
        try:
            with Image.open(io.BytesIO(data)) as img:
                out[k] = img.size
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
            raise KtrayError(
                f"image {sources[k]} cannot be read: {type(e).__name__}: {e}"
            ) from None
    return out


_image_columns: dict[str, str] = {}


def _image_column(uri: str) -> str:
    if uri not in _image_columns:
        _image_columns[uri] = image_column(_schema(uri)) or ""
    return _image_columns[uri]


def _schema(uri: str) -> pa.Schema:
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise KtrayError(f"cannot read parquet file {uri}: {type(e).__name__}: {e}") from None


def check_files(uri: str, mask_column: str) -> list[str]:
    """The Parquet files of ``uri``, each with an image bytes column and a mask bytes column.

    Raises:
        KtrayError: No files, or a file lacking either column (named, with its columns).
    """
    files = expand_files(uri, (".parquet",), "parquet files")
    for f in files:
        schema = _schema(f)
        img = image_column(schema)
        if mask_column not in schema.names:
            raise KtrayError(
                f"no mask column {mask_column!r} in {f} (data.mask_column; its columns: "
                f"{', '.join(schema.names)})"
            )
        if not _bytes_column(schema.field(mask_column).type):
            raise KtrayError(
                f"mask column {mask_column!r} of {f} holds {schema.field(mask_column).type}, "
                "not encoded mask bytes (PNG)"
            )
        if img is None or img == mask_column:
            raise KtrayError(
                f"no image bytes column (jpg/png/webp/image/bytes/img) besides the mask column "
                f"{mask_column!r} in {f} (its columns: {', '.join(schema.names)})"
            )
        _image_columns[f] = img
    return files


def read_split(uri: str, mask_column: str, mask_name: str) -> pa.Table:
    """Parquet files of image + mask bytes as a segmentation image table (label -1,
    ``mask_name`` = ``URI#ROW:COLUMN``); img2dataset rows whose ``status`` is not
    ``"success"`` are left out, as for classification Parquet.

    Raises:
        KtrayError: See :func:`check_files`.
    """
    check_files(uri, mask_column)
    table = read_parquet_images(uri)
    masks = []
    for src in table[C.SOURCE].to_pylist():
        _, file, frag = parse_source(src)
        masks.append(mask_ref(file, int(frag), mask_column))
    return table.append_column(mask_name, pa.array(masks, pa.string()))
