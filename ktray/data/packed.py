"""Image tables of packed datasets: Parquet files of encoded images (img2dataset / Hugging Face
layout) and webdataset ``.tar`` shards; listing them reads no image bytes."""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ktray.data.image_table import make_image_table
from ktray.data.labels import encode_labels, label_names
from ktray.data.listing import expand_files, file_stem, unique_ids
from ktray.data.sources import image_column, load_tar_bytes
from ktray.data.tarlist import list_shard, scan_tar_members
from ktray.errors import KtrayError


def parquet_label_names(uri: str, label_column: str) -> list[str] | None:
    """The sorted distinct labels of Parquet files whose label column holds strings (class
    names), or None when it holds integers. Reads the label column only.

    Raises:
        KtrayError: A missing label column, or labels mixing strings and numbers.
    """
    values: set = set()
    for f in expand_files(uri, (".parquet",), "parquet files"):
        fs, path = fsspec.core.url_to_fs(f)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if label_column not in pf.schema_arrow.names:
                raise KtrayError(f"no label column {label_column!r} in {f}")
            values |= {
                v for v in pf.read(columns=[label_column]).column(0).to_pylist() if v is not None
            }
    return label_names(values, uri, label_column)


def read_parquet_images(
    uri: str, label_column: str | None = None, class_names: list[str] | None = None
) -> pa.Table:
    """Rows of Parquet files of encoded images (img2dataset / HF layout) as an image table.

    Args:
        uri: A Parquet file, a folder of them, or a glob.
        label_column: Column with the labels (nulls become -1); default unlabeled. Integer
            class indices from 0, or class names (strings) when ``class_names`` is given.
        class_names: The classes in label order: string labels are looked up in it, integer
            labels must be below its length.

    Returns:
        The image table; sources are ``file#row``, image ids come from a ``key`` column when
        present (else ``<file stem>/<row>``). img2dataset rows whose ``status`` is not
        ``"success"`` are left out.

    Raises:
        KtrayError: No files, a file without an image column, a missing label column, or a
            label that is not a class (a string without class names, out of range, negative).
    """
    files = expand_files(uri, (".parquet",), "parquet files")
    keys, prefixes, sources, labels = [], [], [], []
    for f in files:
        fs, path = fsspec.core.url_to_fs(f)
        try:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                if image_column(schema) is None:
                    raise KtrayError(f"no image bytes column (jpg/png/webp/image/bytes) in {f}")
                if label_column and label_column not in schema.names:
                    raise KtrayError(f"no label column {label_column!r} in {f}")
                want = [c for c in ("key", "status", label_column) if c and c in schema.names]
                meta = pf.read(columns=want) if want else None
                n = pf.metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise KtrayError(f"cannot read parquet file {f}: {e}")
        rows = list(range(n))
        if meta is not None and "status" in meta.column_names:
            status = meta.column("status").to_pylist()
            rows = [r for r in rows if status[r] == "success"]
        stem = file_stem(f)
        if meta is not None and "key" in meta.column_names:
            key = meta.column("key").to_pylist()
            keys += [str(key[r]) if key[r] is not None else f"{stem}/{r}" for r in rows]
        else:
            keys += [f"{stem}/{r}" for r in rows]
        prefixes += [stem] * len(rows)
        sources += [f"{f}#{r}" for r in rows]
        if label_column:
            lab = meta.column(label_column).to_pylist()
            labels += encode_labels([lab[r] for r in rows], class_names, f, label_column)
    return make_image_table(unique_ids(keys, prefixes), sources, labels if label_column else None)


def read_webdataset(uri_or_glob: str, label_ext: str | None = None) -> pa.Table:
    """Samples of webdataset ``.tar`` shards that have an image member.

    Args:
        uri_or_glob: A shard, a folder of shards, a glob or a brace pattern
            (``shards/{000..009}.tar``).
        label_ext: Optional member extension holding an integer label as text (``"cls"``).

    Returns:
        The image table; one row per sample key (``dir/name`` up to the first dot of the
        member name), source ``shard.tar#member``, image id the key (prefixed with the shard
        name when keys repeat across shards). Listing reads no image bytes: img2dataset's
        sidecar ``<shard>.parquet`` (+ ``_stats.json``) gives the keys, other shards have
        their headers streamed once (:mod:`ktray.data.tarlist`).
    """
    shards = expand_files(uri_or_glob, (".tar", ".tar.gz", ".tgz"), "tar shards")
    keys, prefixes, sources, labels = [], [], [], []
    ext_cache: dict = {}  # img2dataset sidecars: the image extension, read once
    for shard in shards:
        samples: dict[str, dict[str, str]] = {}
        # Without a label, names come from the img2dataset sidecar Parquet when there is one;
        # else (and for labels) from the tar headers, streamed once: no image bytes are read.
        names = scan_tar_members(shard) if label_ext else list_shard(shard, ext_cache)
        for name in names:
            d, b = os.path.split(name)
            if b.startswith("."):
                continue
            stem, _, ext = b.partition(".")
            samples.setdefault(f"{d}/{stem}" if d else stem, {})[ext.lower()] = name
        label_members = []
        for key, members in samples.items():
            ext = next(
                (
                    e
                    for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
                    if e in members
                ),
                None,
            )
            if ext is None:
                continue
            keys.append(key)
            prefixes.append(file_stem(shard))
            sources.append(f"{shard}#{members[ext]}")
            if label_ext:
                if label_ext not in members:
                    raise KtrayError(f"sample {key} in {shard} has no .{label_ext} member")
                label_members.append(members[label_ext])
        if label_ext:
            for raw in load_tar_bytes(shard, label_members):
                labels.append(int(raw.decode().strip()))
    if not keys:
        raise KtrayError(f"no image samples in tar shards at {uri_or_glob}")
    return make_image_table(unique_ids(keys, prefixes), sources, labels if label_ext else None)
