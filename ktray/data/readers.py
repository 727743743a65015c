"""Readers that turn a dataset on disk (or in an object store) into an image table.

An image table is a ``pyarrow.Table`` with ``image_id: string`` (unique), ``source: string`` (an
image source string, see :mod:`ktray.data.sources`) and ``label: int64`` (-1 when unlabeled).
Every reader lists files through fsspec, so local paths and ``s3://`` URIs both work.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ktray.data import columns as C
from ktray.data.labels import encode_labels, label_names
from ktray.data.sources import idx_count, image_column, load_tar_bytes, read_idx_array
from ktray.data.tarlist import is_metadata_parquet, list_shard, scan_tar_members
from ktray.errors import KtrayError

DATA_KINDS = ("fashion_mnist", "imagefolder", "parquet", "segfolder", "fashion_mosaic")
"""``segfolder`` / ``fashion_mosaic``: segmentation tasks (:mod:`ktray.data.segmentation`)."""
"""``data.kind``: IDX files (:func:`read_idx`), class folders (:func:`read_imagefolder`) or
Parquet files of encoded images (:func:`read_parquet_images`)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_TABLE_SCHEMA = pa.schema(
    [(C.IMAGE_ID, pa.string()), (C.SOURCE, pa.string()), (C.LABEL, pa.int64())]
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")


def make_image_table(image_ids, sources, labels=None) -> pa.Table:
    """Build an image table; ``labels=None`` means every row is unlabeled (-1)."""
    image_ids, sources = [str(i) for i in image_ids], [str(s) for s in sources]
    if labels is None:
        labels = [C.UNLABELED] * len(image_ids)
    return pa.table(
        [
            pa.array(image_ids, pa.string()),
            pa.array(sources, pa.string()),
            pa.array(labels, pa.int64()),
        ],
        schema=IMAGE_TABLE_SCHEMA,
    )


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path listed by ``fs`` as a string that fsspec resolves back to the same file."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _rel(path: str, root: str) -> str:
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
        if _GLOB_CHARS.search(path):
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
        out += [_to_uri(fs, p) for p in sorted(found)]
    if not out:
        raise KtrayError(f"no {what} ({'/'.join(suffixes)}) at {uri}")
    return out


def _unique_ids(keys: list[str], prefixes: list[str]) -> list[str]:
    """Keys as image ids, prefixed with their file's stem only when keys repeat across files."""
    if len(set(keys)) == len(keys):
        return keys
    ids = [f"{p}/{k}" for p, k in zip(prefixes, keys)]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise KtrayError(f"duplicate image key {dup!r}")
    return ids


def _stem(uri: str) -> str:
    name = os.path.basename(uri.rstrip("/"))
    for ext in (".parquet", ".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def read_imagefolder(
    root: str, split: str | None = None, class_names: list[str] | None = None
) -> tuple[pa.Table, list[str]]:
    """Read an ImageFolder tree ``root[/split]/<class>/**/<image>``.

    Args:
        root: Folder path or URI.
        split: Optional subfolder (``"train"``, ``"test"``).
        class_names: The label order to use (from the training split); every class folder
            must be one of them. Default: the sorted class folder names.

    Returns:
        ``(table, class_names)``; image ids are paths relative to ``root``.

    Raises:
        KtrayError: Missing folder, no class folders, an empty class folder, or a class that
            is not in ``class_names``.
    """
    fs, base = fsspec.core.url_to_fs(str(root))
    base = base.rstrip("/")
    folder = f"{base}/{split}" if split else base
    if not fs.isdir(folder):
        raise KtrayError(f"image folder not found: {_to_uri(fs, folder)}")
    classes = sorted(
        os.path.basename(e["name"].rstrip("/"))
        for e in fs.ls(folder, detail=True)
        if e["type"] == "directory"
    )
    classes = [c for c in classes if not c.startswith(".")]
    if not classes:
        raise KtrayError(f"no class folders in {_to_uri(fs, folder)}")
    names = list(class_names) if class_names is not None else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise KtrayError(
            f"class folder {unknown[0]!r} in {_to_uri(fs, folder)} is not one of "
            f"the training classes"
        )
    index = {c: i for i, c in enumerate(names)}
    ids, sources, labels = [], [], []
    for c in classes:
        files = sorted(p for p in fs.find(f"{folder}/{c}") if _is_image(p))
        if not files:
            raise KtrayError(f"class folder has no images: {_to_uri(fs, folder + '/' + c)}")
        ids += [_rel(p, base) for p in files]
        sources += [_to_uri(fs, p) for p in files]
        labels += [index[c]] * len(files)
    return make_image_table(ids, sources, labels), names


def read_unlabeled_folder(root: str) -> pa.Table:
    """Every image under ``root`` (recursively), label -1; image ids are relative paths.

    Raises:
        KtrayError: The folder is missing or holds no images.
    """
    fs, base = fsspec.core.url_to_fs(str(root))
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise KtrayError(f"image folder not found: {root}")
    files = sorted(p for p in fs.find(base) if _is_image(p))
    if not files:
        raise KtrayError(f"no images under {root}")
    return make_image_table([_rel(p, base) for p in files], [_to_uri(fs, p) for p in files])


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
        stem = _stem(f)
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
    return make_image_table(_unique_ids(keys, prefixes), sources, labels if label_column else None)


def _idx_file(fs, folder: str, prefix: str, kind: str) -> str | None:
    for sep in ("-", "."):
        for gz in (".gz", ""):
            path = f"{folder}/{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte{gz}"
            if fs.exists(path):
                return path
    return None


def read_idx(folder: str, split: str = "train") -> pa.Table:
    """Read MNIST / Fashion-MNIST IDX files (gzipped or not) as a labeled image table.

    Args:
        folder: Folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        split: ``"train"`` or ``"test"``.

    Returns:
        The image table; sources are ``<images file>#<row>``, image ids ``<split>/<row>``.

    Raises:
        KtrayError: A bad split, missing files, or images and labels of different counts.
    """
    if split not in ("train", "test"):
        raise KtrayError(f"IDX split must be 'train' or 'test', not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    fs, base = fsspec.core.url_to_fs(str(folder))
    base = base.rstrip("/")
    images = _idx_file(fs, base, prefix, "images")
    labels_path = _idx_file(fs, base, prefix, "labels")
    if images is None or labels_path is None:
        raise KtrayError(
            f"IDX files not found in {folder}: expected {prefix}-images-idx3-ubyte.gz"
            f" and {prefix}-labels-idx1-ubyte.gz (gzipped or not)"
        )
    images_uri, labels_uri = _to_uri(fs, images), _to_uri(fs, labels_path)
    labels = read_idx_array(labels_uri)
    n = idx_count(images_uri)
    if labels.ndim != 1 or len(labels) != n:
        raise KtrayError(f"{labels_uri} has {len(labels)} labels for {n} images in {images_uri}")
    return make_image_table(
        [f"{split}/{i}" for i in range(n)],
        [f"{images_uri}#{i}" for i in range(n)],
        labels.astype("int64"),
    )


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
            prefixes.append(_stem(shard))
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
    return make_image_table(_unique_ids(keys, prefixes), sources, labels if label_ext else None)


def read_gallery(uri: str) -> pa.Table:
    """An unlabeled image table from a folder of images, Parquet files or tar shards.

    The kind is chosen by content: Parquet files of encoded images win over tar shards, which
    win over loose images. Parquet files with a ``key`` column and no image column beside tar
    shards are img2dataset's webdataset metadata: the tars are the gallery.

    Raises:
        KtrayError: Nothing readable at ``uri``.
    """
    uri = str(uri)
    fs, path = fsspec.core.url_to_fs(expand_braces(uri)[0])
    if _GLOB_CHARS.search(path) or "{" in uri or not fs.isdir(path):
        if uri.endswith(".parquet"):
            return read_parquet_images(uri)
        if uri.endswith((".tar", ".tar.gz", ".tgz")):
            return read_webdataset(uri)
        if _is_image(path) and fs.exists(path):
            return make_image_table([os.path.basename(path)], [uri])
        raise KtrayError(f"gallery not found or of unknown kind: {uri}")
    files = [p for p in fs.find(path) if not os.path.basename(p).startswith(".")]
    parquets = [p for p in files if p.endswith(".parquet")]
    has_tars = any(p.endswith((".tar", ".tar.gz", ".tgz")) for p in files)
    if parquets and not (has_tars and is_metadata_parquet(_to_uri(fs, parquets[0]))):
        return read_parquet_images(uri)
    if has_tars:
        return read_webdataset(uri)
    return read_unlabeled_folder(uri)
