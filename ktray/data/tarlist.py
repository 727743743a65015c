"""Listing webdataset tar shards without reading their image bytes.

A gallery of 10M-100M images is listed on one driver, so listing must not download the
shards. img2dataset's webdataset output (``--output_format webdataset``) puts beside every
``NNNNN.tar`` a metadata-only ``NNNNN.parquet`` (columns ``key``, ``status``, ``url``, ...;
the rows with ``status == "success"`` are the samples in the tar) and ``NNNNN_stats.json``
(``successes``, ``count``, ...). The member names follow from the keys: ``<key>.<ext>`` with
one image extension for the whole run (img2dataset's ``encode_format``), read once from the
first tar's first headers.

Tars without a sidecar are listed by streaming their headers once: a seekable reader reads
each 512-byte header and seeks over the member's data (local files and object-store range
reads alike), so image bytes are skipped, not downloaded.
"""

from __future__ import annotations

import json
import os
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ktray.data.sources import image_column
from ktray.errors import KtrayError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
HEADER_BLOCK = 64 * 1024
"""Read size when streaming tar headers from an object store (a header is 512 bytes)."""


def shard_stem(tar_uri: str) -> str:
    """``dir/00012.tar`` -> ``dir/00012`` (also ``.tar.gz`` / ``.tgz``)."""
    for ext in (".tar.gz", ".tgz", ".tar"):
        if tar_uri.endswith(ext):
            return tar_uri[: -len(ext)]
    return tar_uri


def is_metadata_parquet(uri: str) -> bool:
    """True for a Parquet file with a ``key`` column and no encoded-image column."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise KtrayError(f"cannot read parquet file {uri}: {e}")
    return image_column(schema) is None and "key" in schema.names


def sidecar_keys(tar_uri: str) -> list[str] | None:
    """Keys of the samples in an img2dataset tar, from its sidecar Parquet (None: no sidecar).

    Only the ``key`` and ``status`` columns are read; rows whose status is not ``success``
    were never written to the tar. When ``<stem>_stats.json`` exists its ``successes`` count
    must agree, else the sidecar is not trusted (None).
    """
    stem = shard_stem(tar_uri)
    fs, path = fsspec.core.url_to_fs(stem + ".parquet")
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if "key" not in pf.schema_arrow.names or image_column(pf.schema_arrow) is not None:
                return None
            cols = [c for c in ("key", "status") if c in pf.schema_arrow.names]
            meta = pf.read(columns=cols)
    except (OSError, pa.ArrowException) as e:
        raise KtrayError(f"cannot read metadata parquet {stem}.parquet: {e}")
    keys = meta.column("key").to_pylist()
    status = meta.column("status").to_pylist() if "status" in cols else ["success"] * len(keys)
    keys = [str(k) for k, s in zip(keys, status) if s == "success" and k is not None]
    sfs, spath = fsspec.core.url_to_fs(stem + "_stats.json")
    if sfs.exists(spath):
        with sfs.open(spath, "rb") as fh:
            successes = json.load(fh).get("successes")
        if successes is not None and int(successes) != len(keys):
            return None
    return keys


def scan_tar_members(tar_uri: str, stop_at_image: bool = False) -> list[str]:
    """Regular-file member names of a tar, reading headers only (data is seeked over).

    Args:
        tar_uri: an uncompressed or gzip-compressed tar (gzip has to be streamed whole).
        stop_at_image: return as soon as one image member is seen (to learn the extension).
    """
    fs, path = fsspec.core.url_to_fs(tar_uri)
    names = []
    try:
        with fs.open(path, "rb", block_size=HEADER_BLOCK) as fh:
            with tarfile.open(fileobj=fh, mode="r:*") as tar:
                for m in tar:  # iterating reads one header at a time
                    if not m.isfile():
                        continue
                    names.append(m.name)
                    if stop_at_image and _ext(m.name) in IMAGE_EXTS:
                        break
    except (OSError, tarfile.TarError) as e:
        raise KtrayError(f"cannot read tar shard {tar_uri}: {e}")
    return names


def image_extension(tar_uri: str) -> str | None:
    """The image extension of the first image member of a tar (reads a few headers)."""
    names = scan_tar_members(tar_uri, stop_at_image=True)
    return next((_ext(n) for n in names if _ext(n) in IMAGE_EXTS), None)


def list_shard(tar_uri: str, ext_cache: dict | None = None) -> list[str]:
    """Member names of a tar shard: from the img2dataset sidecar when there is one (image
    members only, ``<key>.<ext>``), else by streaming the headers once (every member).

    Args:
        tar_uri: the shard.
        ext_cache: shared between calls of one listing, so the image extension is read from
            the first shard only (img2dataset writes one format per run).
    """
    keys = sidecar_keys(tar_uri)
    if keys is None:
        return scan_tar_members(tar_uri)
    if not keys:
        return []
    cache = ext_cache if ext_cache is not None else {}
    if cache.get("ext") is None:
        cache["ext"] = image_extension(tar_uri)
    if cache["ext"] is None:
        return scan_tar_members(tar_uri)
    return [f"{k}.{cache['ext']}" for k in keys]


def _ext(name: str) -> str:
    return os.path.basename(name).partition(".")[2].lower()
