"""A task = labeled train (+ validation) images, test images and transfer sources.

``prepare_task(cfg)`` reads the task data, validates it (missing paths, empty class folders,
class counts), draws the labeled subset and writes every split as an image table
(``image_id, source, label``) under ``OUT/data/``, so that every later stage, on any node,
reads the same rows by URI. Transfer sets are image tables too: ``in_domain`` (the task's
unlabeled images), ``generic`` (the out-of-domain pool), ``curated`` (from ``ktray curate``) or
the URI of any image table / image folder / parquet of image bytes.
"""

from __future__ import annotations

import pyarrow as pa

from ktray import storage
from ktray.pipeline import manifest
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.data import readers
from ktray.data.generic import build_generic_pool
from ktray.data.task import subsample_per_class
from ktray.errors import KtrayError

SPLITS = ("train", "val", "test", "unlabeled")
TRANSFER_NAMES = ("in_domain", "generic", "curated")


def data_dir(cfg: Config) -> str:
    return storage.join(cfg.out, "data")


def _read_splits(cfg: Config) -> tuple[pa.Table, pa.Table, pa.Table | None, list[str]]:
    d = cfg.data
    if d.kind == "fashion_mnist":
        train = readers.read_idx(d.root, "train")
        test = readers.read_idx(d.root, "test")
        names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"]
        return train, test, None, names
    if d.kind == "imagefolder":
        if not storage.exists(d.root):
            raise KtrayError(f"data.root not found: {d.root}")
        for split in ("train", "test"):
            if not storage.exists(storage.join(d.root, split)):
                raise KtrayError(f"data.root {d.root} has no '{split}/' folder "
                                 "(expected train/<class>/*, test/<class>/*)")
        train, names = readers.read_imagefolder(storage.join(d.root, "train"))
        test, _ = readers.read_imagefolder(storage.join(d.root, "test"), class_names=names)
        unlabeled = None
        if storage.exists(storage.join(d.root, "unlabeled")):
            unlabeled = readers.read_unlabeled_folder(storage.join(d.root, "unlabeled"))
        return train, test, unlabeled, names
    if d.kind == "parquet":
        train = readers.read_parquet_images(storage.join(d.root, "train*.parquet"), d.label_column)
        test = readers.read_parquet_images(storage.join(d.root, "test*.parquet"), d.label_column)
        n = int(pa.compute.max(train[C.LABEL]).as_py()) + 1
        unlabeled = None
        fs, path = storage.fs_and_path(storage.join(d.root, "unlabeled*.parquet"))
        if fs.glob(path):
            unlabeled = readers.read_parquet_images(storage.join(d.root, "unlabeled*.parquet"))
        return train, test, unlabeled, [str(i) for i in range(n)]
    raise KtrayError(f"unknown data.kind '{d.kind}'; valid: fashion_mnist, imagefolder, parquet")


def _unlabeled(table: pa.Table) -> pa.Table:
    return table.set_column(table.schema.get_field_index(C.LABEL), C.LABEL,
                            pa.array([C.UNLABELED] * len(table), pa.int64()))


def prepare_task(cfg: Config) -> dict:
    """Write the task's image tables under OUT/data/ (reused when already there)."""
    out = data_dir(cfg)
    h = config_hash(cfg.data, cfg.task)
    done = manifest.load_finished(out, h)
    if done is not None:
        return done
    d = cfg.data
    train_all, test, unlabeled, names = _read_splits(cfg)
    if d.labels_per_class > 0:
        train, rest = subsample_per_class(train_all, d.labels_per_class, d.seed)
        # The train images left unlabeled are the in-domain transfer set (labels dropped).
        extra = _unlabeled(rest)
        unlabeled = extra if unlabeled is None else pa.concat_tables([unlabeled, extra])
    else:
        train = train_all
    val = None
    if d.val_per_class > 0:
        val, train = subsample_per_class(train, d.val_per_class, d.seed + 1)
    if d.test_limit > 0:
        test = test.slice(0, d.test_limit)
    if unlabeled is not None and d.unlabeled_limit > 0 and len(unlabeled) > d.unlabeled_limit:
        import numpy as np

        rng = np.random.default_rng(d.seed)
        keep = np.sort(rng.choice(len(unlabeled), d.unlabeled_limit, replace=False))
        unlabeled = unlabeled.take(pa.array(keep))
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
    return manifest.write(out, {
        "stage": "data", "config_hash": h, "task": cfg.task, "class_names": names,
        "num_classes": len(names), "outputs": outputs, "rows": counts,
    })


def split_table(cfg: Config, split: str) -> pa.Table | None:
    info = prepare_task(cfg)
    uri = info["outputs"].get(split)
    return storage.read_parquet(uri) if uri else None


def transfer_uri(cfg: Config, name: str) -> str:
    """The image-table URI of transfer set ``name`` (a known name or any URI)."""
    info = prepare_task(cfg)
    if name == "in_domain":
        if "unlabeled" not in info["outputs"]:
            raise KtrayError("transfer set 'in_domain' needs unlabeled images: set "
                             "data.labels_per_class > 0 or provide data.root/unlabeled/")
        return info["outputs"]["unlabeled"]
    if name == "generic":
        if "generic" not in info["outputs"]:
            raise KtrayError("transfer set 'generic' needs data.generic_images > 0")
        return info["outputs"]["generic"]
    if name == "curated":
        uri = storage.join(cfg.out, "curate", "transfer_set.parquet")
        if not storage.exists(uri):
            raise KtrayError("transfer set 'curated' needs a finished 'ktray curate' run "
                             f"({uri} is missing)")
        return uri
    if not storage.exists(name):
        raise KtrayError(f"unknown transfer set '{name}': not one of {', '.join(TRANSFER_NAMES)} "
                         "and no such path")
    return name


def read_transfer(cfg: Config, name: str) -> pa.Table:
    uri = transfer_uri(cfg, name)
    if uri.endswith(".parquet"):
        table = storage.read_parquet(uri)
        if C.SOURCE in table.column_names:
            return table
        return readers.read_parquet_images(uri)
    return readers.read_gallery(uri)
