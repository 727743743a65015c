"""Listing dataset files through fsspec (local paths and ``s3://`` URIs alike): files named
by a file, a folder, a glob or a webdataset brace pattern; image files; image ids that stay
unique across files."""

from __future__ import annotations

import os
import re
from collections import Counter

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ktray.errors import KtrayError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")


def is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path listed by ``fs`` as a string that fsspec resolves back to the same file."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def rel_path(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) :].lstrip("/")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``a-{000..002}.tar``, ``{x,y}.tar``."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def expand_files(uri: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    """Files named by a file, a folder (searched recursively), a glob or a brace pattern.

    Args:
        uri: Path or URI.
        suffixes: File name endings to keep when ``uri`` is a folder or a pattern.
        what: What the files are, for error messages ("parquet files").

    Returns:
        Sorted URIs of the files.

    Raises:
        KtrayError: Nothing matches.
    """
    uri = str(uri)
    out: list[str] = []
    for pattern in expand_braces(uri):
        fs, path = fsspec.core.url_to_fs(pattern)
        if GLOB_CHARS.search(path):
            found = [p for p in fs.glob(path) if p.endswith(suffixes)]
        elif fs.isdir(path):
            found = [
                p
                for p in fs.find(path)
                if p.endswith(suffixes) and not os.path.basename(p).startswith(".")
            ]
        elif fs.exists(path):
            found = [path]
        else:
            raise KtrayError(f"{what} not found: {pattern}")
        out += [to_uri(fs, p) for p in sorted(found)]
    if not out:
        raise KtrayError(f"no {what} ({'/'.join(suffixes)}) at {uri}")
    return out


def unique_ids(keys: list[str], prefixes: list[str]) -> list[str]:
    """Keys as image ids, prefixed with their file's stem only when keys repeat across files."""
    if len(set(keys)) == len(keys):
        return keys
    ids = [f"{p}/{k}" for p, k in zip(prefixes, keys)]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise KtrayError(f"duplicate image key {dup!r}")
    return ids


def file_stem(uri: str) -> str:
    name = os.path.basename(uri.rstrip("/"))
    for ext in (".parquet", ".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]
