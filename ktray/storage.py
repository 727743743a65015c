"""Output locations that are local paths or ``s3://`` URIs, with atomic writes.

Every file ktray writes goes to a temporary name beside its final name and is renamed when
complete, so a killed run never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ktray.errors import KtrayError


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path within it, for a local path or URI."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_local_path(uri: str) -> Iterator[str]:
    """Yield a local file path to write; on success it becomes ``uri`` atomically.

    Local: a temporary file in the same folder, then ``os.replace``. Remote: a local temporary
    file, uploaded under a temporary key and moved to its final key (object stores have no
    rename; the final key appears only once the upload is complete).
    """
    fs, path = fs_and_path(uri)
    if not is_remote(uri):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _tmp_name(path)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, os.path.basename(path))
        yield local
        tmp = _tmp_name(path)
        fs.put_file(local, tmp)
        fs.mv(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_local_path(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KtrayError(f"file not found: {uri}")


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    with atomic_local_path(uri) as tmp:
        pq.write_table(table, tmp)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, or every ``*.parquet`` under a folder (hidden temporaries excluded)."""
    fs, path = fs_and_path(uri)
    if not fs.exists(path):
        raise KtrayError(f"parquet not found: {uri}")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet")
                       and not os.path.basename(p).startswith("."))
        if not files:
            raise KtrayError(f"no parquet files under {uri}")
        return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=fs) for f in files])
    return pq.read_table(path, columns=columns, filesystem=fs)


def download_dir(uri: str, local_dir: str) -> str:
    """Local copy of a remote folder (or the folder itself when local)."""
    if not is_remote(uri):
        return uri
    fs, path = fs_and_path(uri)
    fs.get(path.rstrip("/") + "/", local_dir, recursive=True)
    return local_dir
