"""Readers that turn a dataset on disk (or in an object store) into an image table
(:mod:`ktray.data.image_table`): class folders, loose images, IDX files, and the packed kinds
(:mod:`ktray.data.packed`: Parquet bytes, webdataset tars), chosen by ``data.kind`` or, for a
gallery, by content. Every reader lists files through fsspec (:mod:`ktray.data.listing`), so
local paths and ``s3://`` URIs both work.
"""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa

# re-exported: ``ktray.data.readers`` is where the pipeline finds every reader and helper
from ktray.data.image_table import IMAGE_TABLE_SCHEMA, make_image_table  # noqa: F401
from ktray.data.listing import (  # noqa: F401
    GLOB_CHARS,
    IMAGE_EXTENSIONS,
    expand_braces,
    expand_files,
    is_image,
    rel_path,
    to_uri,
)
from ktray.data.packed import (  # noqa: F401
    parquet_label_names,
    read_parquet_images,
    read_webdataset,
)
from ktray.data.sources import idx_count, read_idx_array
from ktray.data.tarlist import is_metadata_parquet
from ktray.errors import KtrayError

DATA_KINDS = (
    "fashion_mnist",
    "imagefolder",
    "parquet",
    "segfolder",
    "segparquet",
    "fashion_mosaic",
)
"""``data.kind``: IDX files (:func:`read_idx`), class folders (:func:`read_imagefolder`) or
Parquet files of encoded images (:func:`read_parquet_images`); ``segfolder`` / ``segparquet`` /
``fashion_mosaic``: segmentation tasks (:mod:`ktray.data.segmentation`)."""
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
        raise KtrayError(f"image folder not found: {to_uri(fs, folder)}")
    classes = sorted(
        os.path.basename(e["name"].rstrip("/"))
        for e in fs.ls(folder, detail=True)
        if e["type"] == "directory"
    )
    classes = [c for c in classes if not c.startswith(".")]
    if not classes:
        raise KtrayError(f"no class folders in {to_uri(fs, folder)}")
    names = list(class_names) if class_names is not None else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise KtrayError(
            f"class folder {unknown[0]!r} in {to_uri(fs, folder)} is not one of "
            f"the training classes"
        )
    index = {c: i for i, c in enumerate(names)}
    ids, sources, labels = [], [], []
    for c in classes:
        files = sorted(p for p in fs.find(f"{folder}/{c}") if is_image(p))
        if not files:
            raise KtrayError(f"class folder has no images: {to_uri(fs, folder + '/' + c)}")
        ids += [rel_path(p, base) for p in files]
        sources += [to_uri(fs, p) for p in files]
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
    files = sorted(p for p in fs.find(base) if is_image(p))
    if not files:
        raise KtrayError(f"no images under {root}")
    return make_image_table([rel_path(p, base) for p in files], [to_uri(fs, p) for p in files])


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
    images_uri, labels_uri = to_uri(fs, images), to_uri(fs, labels_path)
    labels = read_idx_array(labels_uri)
    n = idx_count(images_uri)
    if labels.ndim != 1 or len(labels) != n:
        raise KtrayError(f"{labels_uri} has {len(labels)} labels for {n} images in {images_uri}")
    return make_image_table(
        [f"{split}/{i}" for i in range(n)],
        [f"{images_uri}#{i}" for i in range(n)],
        labels.astype("int64"),
    )


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
    if GLOB_CHARS.search(path) or "{" in uri or not fs.isdir(path):
        if uri.endswith(".parquet"):
            return read_parquet_images(uri)
        if uri.endswith((".tar", ".tar.gz", ".tgz")):
            return read_webdataset(uri)
        if is_image(path) and fs.exists(path):
            return make_image_table([os.path.basename(path)], [uri])
        raise KtrayError(f"gallery not found or of unknown kind: {uri}")
    files = [p for p in fs.find(path) if not os.path.basename(p).startswith(".")]
    parquets = [p for p in files if p.endswith(".parquet")]
    has_tars = any(p.endswith((".tar", ".tar.gz", ".tgz")) for p in files)
    if parquets and not (has_tars and is_metadata_parquet(to_uri(fs, parquets[0]))):
        return read_parquet_images(uri)
    if has_tars:
        return read_webdataset(uri)
    return read_unlabeled_folder(uri)
