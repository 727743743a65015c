"""A task = labeled train (+ validation) images, test images and transfer sources.

``prepare_task(cfg)`` reads the task data, validates it (missing paths, empty class folders,
labels, unreadable labeled images), draws the labeled subset (and the validation images: out
of it, or beyond it with ``data.val_from=extra``) and writes every split as an image
table (``image_id, source, label``) under ``OUT/data/``, so that every later stage, on any node,
reads the same rows by URI. Its reuse hash covers the ``data`` settings and a fingerprint of
the listing of ``data.root`` (names, sizes, modification times), so a file added, removed or
replaced there is seen on the next run. Transfer sets are image tables too: ``in_domain`` (the
task's unlabeled images), ``generic`` (the out-of-domain pool), ``curated`` (from
``ktray curate``) or the URI of any image table / image folder / Parquet of image bytes /
webdataset shards, globs and braces included (``DIR/unl-{000..009}.tar``, ``DIR/*.parquet``).
"""

from __future__ import annotations

import difflib

import pyarrow as pa
import pyarrow.compute as pc

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.data import readers
from ktray.data.generic import build_generic_pool
from ktray.data.segmentation import is_segmentation
from ktray.data.sources import load_images
from ktray.data.task import subsample_per_class
from ktray.errors import KtrayError
from ktray.pipeline import manifest, segtask

TRANSFER_NAMES = ("in_domain", "generic", "curated")
TRANSFER_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz") + readers.IMAGE_EXTENSIONS
CLASSES_FILE = "classes.txt"
_CHECK_BATCH = 256


def data_dir(cfg: Config) -> str:
    return storage.join(cfg.out, "data")


def curated_uri(cfg: Config) -> str:
    return storage.join(cfg.out, "curate", "transfer_set.parquet")


def check_layout(cfg: Config) -> None:
    """Cheap checks that ``data.root`` has the layout ``data.kind`` reads (no image read)."""
    d = cfg.data
    if is_segmentation(d.kind):
        segtask.check_layout(cfg)
    elif d.kind == "imagefolder":
        for split in ("train", "test"):
            if not storage.exists(storage.join(d.root, split)):
                raise KtrayError(
                    f"data.root {d.root} has no '{split}/' folder "
                    "(expected train/<class>/*, test/<class>/*)"
                )
    elif d.kind == "parquet":
        for split in ("train", "test"):
            if not _glob(storage.join(d.root, f"{split}*.parquet")):
                raise KtrayError(f"data.root {d.root} has no {split}*.parquet files")


def has_unlabeled(cfg: Config) -> bool:
    """Whether the task has in-domain unlabeled images (the ``in_domain`` transfer set)."""
    d = cfg.data
    if is_segmentation(d.kind):
        return segtask.has_unlabeled(cfg)
    if d.labels_per_class > 0:
        return True  # the train images not drawn as labels
    if d.kind == "imagefolder":
        return storage.exists(storage.join(d.root, "unlabeled"))
    if d.kind == "parquet":
        return bool(_glob(storage.join(d.root, "unlabeled*.parquet")))
    return False


def _glob(pattern: str) -> list[str]:
    fs, path = storage.fs_and_path(pattern)
    return fs.glob(path)


def _class_names(cfg: Config) -> list[str] | None:
    """``data.class_names``, else ``root/classes.txt`` (one name a line), else None."""
    d = cfg.data
    if d.class_names:
        return list(d.class_names)
    uri = storage.join(d.root, CLASSES_FILE)
    if d.kind != "fashion_mnist" and storage.exists(uri):
        names = [n.strip() for n in storage.read_bytes(uri).decode().splitlines() if n.strip()]
        if len(set(names)) != len(names) or not names:
            raise KtrayError(f"{uri} must list distinct class names, one a line")
        return names
    return None


def _read_splits(cfg: Config) -> tuple[pa.Table, pa.Table, pa.Table | None, list[str]]:
    d = cfg.data
    given = _class_names(cfg)
    if d.kind == "fashion_mnist":
        train = readers.read_idx(d.root, "train")
        test = readers.read_idx(d.root, "test")
        return train, test, None, given or list(readers.FASHION_MNIST_CLASSES)
    if d.kind == "imagefolder":
        check_layout(cfg)
        train, names = readers.read_imagefolder(storage.join(d.root, "train"), class_names=given)
        test, _ = readers.read_imagefolder(storage.join(d.root, "test"), class_names=names)
        unlabeled = None
        if storage.exists(storage.join(d.root, "unlabeled")):
            unlabeled = readers.read_unlabeled_folder(storage.join(d.root, "unlabeled"))
        return train, test, unlabeled, names
    check_layout(cfg)
    train_uri = storage.join(d.root, "train*.parquet")
    names = given or readers.parquet_label_names(train_uri, d.label_column)
    train = readers.read_parquet_images(train_uri, d.label_column, class_names=names)
    test = readers.read_parquet_images(
        storage.join(d.root, "test*.parquet"), d.label_column, class_names=names
    )
    if names is None:
        names = [str(i) for i in range(int(pc.max(train[C.LABEL]).as_py()) + 1)]
    unlabeled = None
    if _glob(storage.join(d.root, "unlabeled*.parquet")):
        unlabeled = readers.read_parquet_images(storage.join(d.root, "unlabeled*.parquet"))
    return train, test, unlabeled, names


def _check_labels(train: pa.Table, names: list[str], root: str) -> None:
    labels = train[C.LABEL].to_numpy()
    labeled = labels[labels >= 0]
    if not len(labeled):
        raise KtrayError(f"no labeled training images in {root}")
    if labeled.max() >= len(names):
        raise KtrayError(
            f"label {int(labeled.max())} in {root} is outside 0..{len(names) - 1} "
            f"({len(names)} class names)"
        )
    empty = sorted(set(range(len(names))) - set(labeled.tolist()))
    if empty:
        raise KtrayError(
            f"{len(empty)} of {len(names)} classes have no training image in "
            f"{root} (first: {empty[0]} = {names[empty[0]]!r}); labels must number "
            "the classes from 0, or give data.class_names / classes.txt"
        )


def _check_readable(table: pa.Table, what: str) -> None:
    """Every image of a labeled split decodes; else one line naming the first bad one."""
    sources = table[C.SOURCE].to_pylist()
    bad = []
    for i in range(0, len(sources), _CHECK_BATCH):
        batch = sources[i : i + _CHECK_BATCH]
        bad += [s for s, img in zip(batch, load_images(batch)) if img is None]
    if bad:
        raise KtrayError(
            f"{len(bad)} {what} image(s) cannot be read (missing or corrupt), "
            f"first: {bad[0]}; fix or delete them and run again"
        )


def _unlabeled(table: pa.Table) -> pa.Table:
    return table.set_column(
        table.schema.get_field_index(C.LABEL),
        C.LABEL,
        pa.array([C.UNLABELED] * len(table), pa.int64()),
    )


def input_fingerprint(cfg: Config) -> str:
    """A hash of the listing of ``data.root`` (names, sizes, modification times)."""
    return storage.fingerprint(cfg.data.root)


def prepare_task(cfg: Config) -> dict:
    """Write the task's image tables under OUT/data/ (reused when already there)."""
    out = data_dir(cfg)
    h = config_hash(cfg.data, cfg.task, input_fingerprint(cfg))
    done = manifest.load_finished(out, h)
    if done is not None:
        return done
    d = cfg.data
    seg = is_segmentation(d.kind)
    if seg:  # every image of the train split is labeled (a mask); masks checked there
        train_all, test, unlabeled, names = segtask.read_splits(cfg)
    else:
        train_all, test, unlabeled, names = _read_splits(cfg)
        _check_labels(train_all, names, d.root)
    val = None
    if d.labels_per_class > 0 and not seg:
        train, rest = subsample_per_class(train_all, d.labels_per_class, d.seed)
        if d.val_per_class > 0 and d.val_from == "extra":
            # validation beyond the labels: more labeled images, never in the transfer set
            try:
                val, rest = subsample_per_class(rest, d.val_per_class, d.seed + 1)
            except KtrayError as e:
                raise KtrayError(
                    f"data.val_from=extra: beyond the {d.labels_per_class} labeled images per "
                    f"class, {e}"
                ) from None
        # The train images left unlabeled are the in-domain transfer set (labels dropped).
        extra = _unlabeled(rest)
        unlabeled = extra if unlabeled is None else pa.concat_tables([unlabeled, extra])
    else:
        train = train_all
    if d.val_per_class > 0 and not seg and val is None:  # carved out of the labels
        val, train = subsample_per_class(train, d.val_per_class, d.seed + 1)
    if d.test_limit > 0:
        test = test.slice(0, d.test_limit)
    if unlabeled is not None and d.unlabeled_limit > 0 and len(unlabeled) > d.unlabeled_limit:
        import numpy as np

        rng = np.random.default_rng(d.seed)
        keep = np.sort(rng.choice(len(unlabeled), d.unlabeled_limit, replace=False))
        unlabeled = unlabeled.take(pa.array(keep))
    _check_readable(train if val is None else pa.concat_tables([train, val]), "labeled")
    tables = {"train": train, "val": val, "test": test, "unlabeled": unlabeled}
    outputs = {}
    for split, table in tables.items():
        if table is not None and len(table):
            uri = storage.join(out, f"{split}.parquet")
            storage.write_parquet(uri, table)
            outputs[split] = uri
    if d.generic_images > 0:
        pool_uri = storage.join(out, "generic_pool.parquet")
        pool = build_generic_pool(pool_uri, d.generic_images, size=d.generic_size, seed=d.seed)
        storage.write_parquet(storage.join(out, "generic.parquet"), pool)
        outputs["generic"] = storage.join(out, "generic.parquet")
    counts = {k: (len(v) if v is not None else 0) for k, v in tables.items()}
    counts["generic"] = d.generic_images
    return manifest.write(
        out,
        {
            "stage": "data",
            "config_hash": h,
            "task": cfg.task,
            "task_type": "segmentation" if seg else "classification",
            "class_names": names,
            "num_classes": len(names),
            "outputs": outputs,
            "rows": counts,
        },
    )


def split_table(cfg: Config, split: str) -> pa.Table | None:
    """The prepared task's ``split`` (train, val, test, unlabeled, generic) or None."""
    uri = prepare_task(cfg)["outputs"].get(split)
    return storage.read_parquet(uri) if uri else None


def check_transfer_uri(uri: str) -> None:
    """A transfer set given as a URI (file, folder, glob or braces) names some files.

    Raises:
        KtrayError: Not a known transfer set name and nothing readable there.
    """
    if "/" not in uri and "://" not in uri and not storage.exists(uri):
        close = difflib.get_close_matches(uri, TRANSFER_NAMES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KtrayError(
            f"unknown transfer set '{uri}'{hint}: not one of "
            f"{', '.join(TRANSFER_NAMES)} and no such path"
        )
    try:
        readers.expand_files(uri, TRANSFER_SUFFIXES, "transfer set files")
    except KtrayError as e:
        raise KtrayError(
            f"unknown transfer set '{uri}': not one of {', '.join(TRANSFER_NAMES)}, and {e}"
        ) from None


def transfer_uri(cfg: Config, name: str) -> str:
    """The image-table URI of transfer set ``name`` (a known name or any URI / pattern)."""
    if name not in TRANSFER_NAMES:
        check_transfer_uri(name)
        return name
    info = prepare_task(cfg)
    if name == "in_domain":
        if "unlabeled" not in info["outputs"]:
            raise KtrayError(
                "transfer set 'in_domain' needs unlabeled images: set "
                "data.labels_per_class > 0 or provide data.root/unlabeled/"
            )
        return info["outputs"]["unlabeled"]
    if name == "generic":
        if "generic" not in info["outputs"]:
            raise KtrayError("transfer set 'generic' needs data.generic_images > 0")
        return info["outputs"]["generic"]
    uri = curated_uri(cfg)
    if not storage.exists(uri):
        raise KtrayError(
            f"transfer set 'curated' needs a finished 'ktray curate' run ({uri} is missing)"
        )
    return uri


def transfer_identity(cfg: Config, name: str) -> str:
    """What the rows of transfer set ``name`` were made from, for the reuse hashes of the
    stages that read them: the prepared task's hash for ``in_domain`` and ``generic`` (the
    ``data`` settings and the listing of ``data.root``), the curate run's hash for ``curated``
    (which covers its queries and gallery), else the listing of the URI's files (names, sizes,
    modification times). Images added or replaced under the same path are computed afresh,
    not served from a run over the old ones."""
    if name in ("in_domain", "generic"):
        return prepare_task(cfg)["config_hash"]
    if name == "curated":
        uri = storage.join(cfg.out, "curate", manifest.MANIFEST)
        return storage.read_json(uri).get("config_hash", "") if storage.exists(uri) else ""
    return storage.fingerprint(name)


def read_transfer(cfg: Config, name: str) -> pa.Table:
    """The transfer set ``name`` as an image table."""
    uri = transfer_uri(cfg, name)
    plain = not any(c in uri for c in "*?[{")
    if plain and uri.endswith(".parquet"):
        table = storage.read_parquet(uri)
        if C.SOURCE in table.column_names:
            return table
        return readers.read_parquet_images(uri)
    return readers.read_gallery(uri)
