"""Resolve image source strings to decoded PIL images (ARCHITECTURE.md, "Image source strings").

A source is one of:

- a file path or URI: ``/x/a.jpg``, ``s3://bucket/a.png``;
- ``URI#ROW`` for a row of a Parquet file of encoded bytes (img2dataset layout: column ``jpg``,
  ``png``, ``webp``, ``image`` or ``bytes``; or an ``image`` struct with a ``bytes`` field as HF
  datasets write it), or of an IDX images file (``.../train-images-idx3-ubyte.gz#123``);
- ``URI#MEMBER`` for a member of a webdataset ``.tar`` shard.

Requests are grouped by file, and opened files (Parquet row groups, IDX arrays, tar indexes)
are kept in a small per-process LRU (:mod:`ktray.data.source_cache`), so batched and sequential
loads read each file once; rows of Parquet image files are read by
:mod:`ktray.data.parquet_images`. The image files of a batch on a remote filesystem (s3://) are
read side by side, a GET each (``source_cache.cat_files``: on s3fs's event loop,
``FETCH_AT_ONCE`` at a time).
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import tarfile
import threading
from collections import defaultdict
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from ktray.data import source_cache as sc
from ktray.data.parquet_images import IMAGE_COLUMNS, image_column, load_parquet
from ktray.data.parquet_images import read_ahead as parquet_read_ahead
from ktray.data.source_cache import clear_cache
from ktray.errors import CorruptImageError, KtrayError

__all__ = ["IMAGE_COLUMNS", "clear_cache", "image_column", "load_images", "parse_source"]

log = logging.getLogger(__name__)

_IDX_RE = re.compile(r"idx\d-ubyte(\.gz)?$")
_TAR_RE = re.compile(r"\.(tar|tar\.gz|tgz)$")
_PARQUET_RE = re.compile(r"\.(parquet|parq|pq)$")
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


_lock = sc.lock
_warned: set[str] = set()


def parse_source(source: str) -> tuple[str, str, str]:
    """Split a source string into ``(kind, uri, fragment)``.

    Args:
        source: An image source string.

    Returns:
        kind is ``"file"``, ``"parquet"``, ``"idx"`` or ``"tar"``; fragment is ``""`` for files.
    """
    base, sep, frag = source.rpartition("#")
    if not sep or not base:
        return "file", source, ""
    if _TAR_RE.search(base):
        return "tar", base, frag
    if frag.isdigit():
        if _IDX_RE.search(base):
            return "idx", base, frag
        return "parquet", base, frag
    if _PARQUET_RE.search(base):
        return "parquet", base, frag  # a bad row number: reported when loading
    return "file", source, ""  # a file whose name holds '#'


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (raises on corrupt or truncated data)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.format in ("JPEG", "TIFF", "WEBP"):
        ImageOps.exif_transpose(img, in_place=True)  # camera photos stored sideways
    return img


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------
def read_idx_array(uri: str) -> np.ndarray:
    """Read a whole IDX file (gzipped or not) as a numpy array.

    Args:
        uri: Path or URI of an ``*-idx?-ubyte[.gz]`` file.

    Returns:
        The array with the shape from the IDX header.

    Raises:
        KtrayError: The file is missing or not a valid IDX file.
    """
    try:
        with sc.open_rb(uri) as f:
            raw = gzip.GzipFile(fileobj=f).read() if uri.endswith(".gz") else f.read()
    except (OSError, EOFError) as e:
        raise KtrayError(f"cannot read IDX file {uri}: {e}")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise KtrayError(f"not an IDX file (bad magic number): {uri}")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset < expected:
        raise KtrayError(f"IDX file is truncated: {uri} (header says {shape})")
    arr = np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def idx_count(uri: str) -> int:
    """Number of items in an IDX file, read from its header only."""
    try:
        with sc.open_rb(uri) as f:
            head = (gzip.GzipFile(fileobj=f) if uri.endswith(".gz") else f).read(8)
    except (OSError, EOFError) as e:
        raise KtrayError(f"cannot read IDX file {uri}: {e}")
    if len(head) < 8 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise KtrayError(f"not an IDX file (bad magic number): {uri}")
    return int.from_bytes(head[4:8], "big")


def _load_idx(uri: str, frags: list[str]) -> list[tuple[Any, str | None]]:
    def make():
        arr = read_idx_array(uri)
        return arr, arr.nbytes

    with _lock:
        arr = sc.data_cache.get(("idx", uri), make)
    if arr.ndim not in (3, 4) or arr.dtype != np.uint8:
        return [(None, f"IDX file {uri} does not hold uint8 images")] * len(frags)
    out = []
    for frag in frags:
        i = int(frag)
        if i >= len(arr):
            out.append((None, f"row {i} out of range in {uri} ({len(arr)} images)"))
        else:
            out.append((Image.fromarray(arr[i].copy()), None))
    return out


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------
def _load_parquet(uri: str, frags: list[str]) -> list[tuple[Any, str | None]]:
    encoded = load_parquet(uri, frags)
    # Decode outside the lock: PIL releases the GIL, so threads decode in parallel.
    return [_decode_or_reason(d, r, f"{uri}#{f}") for (d, r), f in zip(encoded, frags)]


# ---------------------------------------------------------------------------------------------
# Webdataset tar
# ---------------------------------------------------------------------------------------------
class _TarHandle:
    """An open tar shard and its members; ``read_lock``: one reader of its file at a time,
    held instead of the cache's lock while members are read (as ``ParquetHandle``)."""

    def __init__(self, uri: str):
        self.read_lock = threading.Lock()
        self.closed = False
        self.file = sc.open_rb(uri)
        self.tar = tarfile.open(fileobj=self.file, mode="r:*")
        self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}

    def close(self) -> None:
        with self.read_lock:  # (evicted from the cache: after a read in progress)
            self.closed = True
            self.tar.close()
            self.file.close()


def _tar_read(uri: str, read):
    """``read(handle)`` of the open shard ``uri`` (``source_cache.read_open``)."""
    return sc.read_open(("tar", uri), lambda: _TarHandle(uri), read)


def list_tar_members(uri: str) -> list[str]:
    """Names of the regular-file members of a tar shard, in archive order."""
    try:
        return _tar_read(uri, lambda h: list(h.members))
    except (OSError, tarfile.TarError) as e:
        raise KtrayError(f"cannot read tar shard {uri}: {e}")


def load_tar_bytes(uri: str, members: list[str]) -> list[bytes]:
    """Raw bytes of named members of a tar shard (used for small ``.cls`` / ``.json`` members).

    Raises:
        KtrayError: The shard cannot be read or a member is missing.
    """
    try:
        return _tar_read(uri, lambda h: [h.tar.extractfile(h.members[m]).read() for m in members])
    except KeyError as e:
        raise KtrayError(f"no member {e.args[0]} in tar shard {uri}")
    except (OSError, tarfile.TarError) as e:
        raise KtrayError(f"cannot read tar shard {uri}: {e}")


def _load_tar(uri: str, frags: list[str]) -> list[tuple[Any, str | None]]:
    def read(h: _TarHandle) -> list:
        encoded = []
        for frag in frags:
            m = h.members.get(frag)
            if m is None:
                encoded.append((None, f"no member {frag} in {uri}"))
            else:
                encoded.append((h.tar.extractfile(m).read(), None))
        return encoded

    encoded = _tar_read(uri, read)
    return [_decode_or_reason(d, r, f"{uri}#{f}") for (d, r), f in zip(encoded, frags)]


def read_ahead(sources: list[str]) -> None:
    """Open the container files ``sources`` (a distill stripe's images) fall in, and read the
    Parquet row groups they need into this process's cache (``parquet_images.read_ahead``):
    run in each stripe's reading thread, a call's files are opened side by side. Errors are
    left to the decoding, which reports them per image."""
    rows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src in sources:
        kind, uri, frag = parse_source(str(src))
        if kind in ("parquet", "tar"):
            rows[(kind, uri)].append(frag)
    for (kind, uri), frags in rows.items():
        try:
            if kind == "parquet":
                parquet_read_ahead(uri, [int(f) for f in frags if f.isdigit()])
            else:
                _tar_read(uri, lambda h: None)
        except (OSError, KtrayError, tarfile.TarError, pa.ArrowException, ValueError):
            pass


# ---------------------------------------------------------------------------------------------
# Plain files
# ---------------------------------------------------------------------------------------------
def _read_file(uri: str) -> tuple[bytes | None, str | None]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.cat_file(path), None
    except (OSError, ValueError) as e:
        return None, f"cannot read {uri}: {type(e).__name__}: {e}"


def _read_remote(uris: list[str]) -> dict[str, tuple[bytes | None, str | None]]:
    """Remote image files read side by side (one GET each: ``source_cache.cat_files``)."""
    by_fs: dict[int, tuple[Any, list[tuple[str, str]]]] = {}
    for uri in dict.fromkeys(uris):
        fs, path = fsspec.core.url_to_fs(uri)
        by_fs.setdefault(id(fs), (fs, []))[1].append((uri, path))
    read = {}
    for fs, items in by_fs.values():
        for (uri, _), got in zip(items, sc.cat_files(fs, [path for _, path in items])):
            if isinstance(got, (OSError, ValueError)):
                read[uri] = None, f"cannot read {uri}: {type(got).__name__}: {got}"
            elif isinstance(got, BaseException):
                raise got
            else:
                read[uri] = got, None
    return read


def _load_files(uris: list[str]) -> list[tuple[Any, str | None]]:
    """Image files: remote ones (s3://, ...) read side by side (one GET each), local ones in
    this thread."""
    remote = [u for u in uris if sc.is_remote(u)]
    read = _read_remote(remote) if len(remote) > 1 else {}
    out = []
    for uri in uris:
        data, reason = read[uri] if uri in read else _read_file(uri)
        out.append(_decode_or_reason(data, reason, uri))
    return out


def _decode_or_reason(data: bytes | None, reason: str | None, where: str):
    if data is None:
        return None, reason
    try:
        return decode_image(data), None
    except _DECODE_ERRORS as e:
        return None, f"cannot decode image ({where}): {type(e).__name__}: {e}"


_LOADERS = {"idx": _load_idx, "parquet": _load_parquet, "tar": _load_tar}


def _load_with_reasons(sources: list[str]) -> list[tuple[Image.Image | None, str | None]]:
    results: list[tuple[Image.Image | None, str | None]] = [(None, None)] * len(sources)
    groups: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    plain: list[int] = []
    for i, src in enumerate(sources):
        kind, uri, frag = parse_source(str(src))
        if kind == "file":
            plain.append(i)
        else:
            groups[(kind, uri)].append((i, frag))
    with _lock:
        sc.check_fork()
    for (kind, uri), items in groups.items():
        try:
            loaded = _LOADERS[kind](uri, [frag for _, frag in items])
        except (OSError, KtrayError, tarfile.TarError, pa.ArrowException, ValueError) as e:
            if uri not in _warned:  # once per file: a missing shard would flood the log
                _warned.add(uri)
                log.warning("cannot open %s: %s", uri, e)
            loaded = [(None, f"cannot open {uri}: {type(e).__name__}: {e}")] * len(items)
        for (i, _), res in zip(items, loaded):
            results[i] = res
    for i, res in zip(plain, _load_files([str(sources[i]) for i in plain])):
        results[i] = res
    return results


def load_images(sources: list[str]) -> list[Image.Image | None]:
    """Decode a batch of images from their source strings.

    Args:
        sources: Image source strings (any mix of kinds and files).

    Returns:
        One fully loaded PIL image per source, in order; None where the image is missing,
        corrupt or truncated. IDX rows come back as mode ``"L"``; other modes as stored.
    """
    return [img for img, _ in _load_with_reasons(list(sources))]


def load_image_strict(source: str) -> Image.Image:
    """Decode one image, raising when it cannot be read.

    Raises:
        CorruptImageError: The image is missing, corrupt or truncated; the message names it.
    """
    img, reason = _load_with_reasons([source])[0]
    if img is None:
        raise CorruptImageError(f"unreadable image {source}: {reason}")
    return img
