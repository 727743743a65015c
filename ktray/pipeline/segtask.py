"""A segmentation task's image tables under OUT/data (``data.kind=segfolder|segparquet|
fashion_mosaic``).

Called by :func:`ktray.pipeline.tasks.prepare_task` for segmentation kinds. Every labeled
image (train) is checked before any training: a missing mask, a mask of another size than its
image, a null Parquet mask, or a class id outside the class list (``classes.txt``,
``data.class_names``, else ``0..max id``) that is not ``data.ignore_index`` stops with one line
naming the file (segparquet: the file and row). The test masks are checked the same way.
``fashion_mosaic`` first writes the offline demo's mosaics as a segfolder under
``OUT/data/mosaic`` (reused when complete).
"""

from __future__ import annotations

import pyarrow as pa

from ktray import storage
from ktray.config import Config
from ktray.data import seg_parquet
from ktray.data import segmentation as seg
from ktray.data.packed import read_parquet_images
from ktray.errors import KtrayError

CLASSES_FILE = "classes.txt"


def seg_root(cfg: Config) -> str:
    """Where the segfolder of the task is: ``data.root``, or the generated mosaics."""
    if cfg.data.kind == "fashion_mosaic":
        return storage.join(cfg.out, "data", "mosaic")
    return cfg.data.root


def _parquet_files(cfg: Config, split: str) -> list[str]:
    """``data.root/<split>*.parquet`` (segparquet), [] when none."""
    fs, path = storage.fs_and_path(storage.join(cfg.data.root, f"{split}*.parquet"))
    return fs.glob(path)


def check_layout(cfg: Config) -> None:
    """Cheap layout check (no image read; segparquet: the columns of every file)."""
    if cfg.data.kind == "segparquet":
        for split in ("train", "test"):
            if not _parquet_files(cfg, split):
                raise KtrayError(
                    f"data.root {cfg.data.root} has no {split}*.parquet files (segparquet "
                    f"expects train*.parquet and test*.parquet with image bytes and a "
                    f"{cfg.data.mask_column!r} column of PNG masks)"
                )
            seg_parquet.check_files(
                storage.join(cfg.data.root, f"{split}*.parquet"), cfg.data.mask_column
            )
        return
    if cfg.data.kind != "segfolder":
        return
    for sub in ("images/train", "images/test", "masks/train", "masks/test"):
        if not storage.exists(storage.join(cfg.data.root, sub)):
            raise KtrayError(
                f"data.root {cfg.data.root} has no '{sub}/' folder (segfolder expects "
                "images/{train,test}/* and masks/{train,test}/*.png)"
            )


def has_unlabeled(cfg: Config) -> bool:
    if cfg.data.kind == "fashion_mosaic":
        return cfg.data.mosaic_unlabeled > 0
    if cfg.data.kind == "segparquet":
        return bool(_parquet_files(cfg, "unlabeled"))
    return storage.exists(storage.join(cfg.data.root, "unlabeled"))


def _names(cfg: Config, root: str) -> list[str] | None:
    if cfg.data.class_names:
        return list(cfg.data.class_names)
    uri = storage.join(root, CLASSES_FILE)
    if storage.exists(uri):
        names = [n.strip() for n in storage.read_bytes(uri).decode().splitlines() if n.strip()]
        if not names or len(set(names)) != len(names):
            raise KtrayError(f"{uri} must list distinct class names, one a line")
        return names
    return None


def read_splits(cfg: Config) -> tuple[pa.Table, pa.Table, pa.Table | None, list[str]]:
    """Train, test, unlabeled tables and class names, every labeled mask checked."""
    d = cfg.data
    if d.kind == "fashion_mosaic":
        local = seg_root(cfg)
        if storage.is_remote(local):
            raise KtrayError("data.kind=fashion_mosaic needs a local out= (mosaics are written)")
        seg.build_fashion_mosaics(
            d.root, local, d.mosaic_train, d.mosaic_unlabeled, d.mosaic_test, d.mosaic_size, d.seed
        )
    root = seg_root(cfg)
    check_layout(cfg)
    if d.kind == "segparquet":
        train = seg.read_segparquet_split(storage.join(root, "train*.parquet"), d.mask_column)
        test = seg.read_segparquet_split(storage.join(root, "test*.parquet"), d.mask_column)
    else:
        train = seg.read_segfolder_split(root, "train")
        test = seg.read_segfolder_split(root, "test")
    if d.test_limit > 0:
        test = test.slice(0, d.test_limit)
    names = _names(cfg, root)
    known = len(names) if names else None
    top, _ = seg.check_masks(train, known, d.ignore_index)
    top_test, _ = seg.check_masks(test, known, d.ignore_index)
    if names is None:
        names = [f"class_{i}" for i in range(max(top, top_test) + 1)]
        if not names:
            raise KtrayError(f"every training mask in {root} is ignore_index {d.ignore_index}")
        seg.check_masks(test, len(names), d.ignore_index)
    if d.kind == "segparquet":
        unlabeled = None
        if has_unlabeled(cfg):
            unlabeled = read_parquet_images(storage.join(root, "unlabeled*.parquet"))
    else:
        unlabeled = seg.read_unlabeled(root)
    return train, test, unlabeled, names
