"""Tests of ktray.data: task assembly, views, datasets, the generic pool, real data and import
hygiene (the readers: tests/test_readers.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datafiles import image, make_bad_files, make_folder
from PIL import Image

from ktray.data import (
    LabeledImages,
    ViewImages,
    ViewParams,
    apply_view,
    build_generic_pool,
    class_counts,
    collate_skip_none,
    eval_transform,
    load_image_strict,
    load_images,
    read_idx,
    read_imagefolder,
    read_parquet_images,
    read_unlabeled_folder,
    sample_view,
    split_validation,
    subsample_per_class,
)
from ktray.errors import CorruptImageError, KtrayError

FASHION = "/usr/share/datasets/fashion-mnist"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------------------------
# Task assembly
# --------------------------------------------------------------------------------------------
def _table(n_per_class: int, classes: int = 3) -> pa.Table:
    n = n_per_class * classes
    return pa.table(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "source": [f"/x/{i}.png" for i in range(n)],
            "label": pa.array([i % classes for i in range(n)], pa.int64()),
        }
    )


def test_subsample_and_validation_split():
    table = _table(10)
    sel, rest = subsample_per_class(table, 4, seed=1)
    assert class_counts(sel) == {0: 4, 1: 4, 2: 4} and rest.num_rows == 18
    again, _ = subsample_per_class(table.take(list(range(29, -1, -1))), 4, seed=1)
    ids = sel.column("image_id").to_pylist()
    assert sorted(again.column("image_id").to_pylist()) == sorted(ids)
    bigger, _ = subsample_per_class(table, 5, seed=1)
    assert set(sel.column("image_id").to_pylist()) < set(bigger.column("image_id").to_pylist())
    other, _ = subsample_per_class(table, 4, seed=2)
    assert other.column("image_id").to_pylist() != sel.column("image_id").to_pylist()
    with pytest.raises(KtrayError, match="class"):
        subsample_per_class(table, 11, seed=0)
    train, val = split_validation(sel, 0.25, seed=0)
    assert class_counts(val) == {0: 1, 1: 1, 2: 1} and train.num_rows == 9
    train, val = split_validation(sel, 2, seed=0)
    assert class_counts(val) == {0: 2, 1: 2, 2: 2}
    assert not set(train.column("image_id").to_pylist()) & set(val.column("image_id").to_pylist())
    with pytest.raises(KtrayError):
        split_validation(sel, 4, seed=0)


# --------------------------------------------------------------------------------------------
# Views and transforms
# --------------------------------------------------------------------------------------------
def test_views_are_deterministic():
    v = [sample_view(0, "img/1", k) for k in range(8)]
    assert v == [sample_view(0, "img/1", k) for k in range(8)]
    assert len(set(v)) == 8
    assert sample_view(1, "img/1", 0) != v[0] and sample_view(0, "img/2", 0) != v[0]
    assert sample_view(0, "img/1", 0, first_view_full=True) == ViewParams.full()
    for p in v:
        assert 0 <= p.x0 < p.x1 <= 1 and 0 <= p.y0 < p.y1 <= 1
        assert 0.35 - 1e-6 <= (p.x1 - p.x0) * (p.y1 - p.y0) <= 1 + 1e-6
        assert np.float32(p.x0) == p.x0  # survives a float32 Parquet column exactly
    assert any(p.flip for p in v) and not all(p.flip for p in v)


def test_apply_view_shape_normalisation_flip_and_gray():
    half = np.zeros((20, 40, 3), np.uint8)
    half[:, 20:] = 255
    img = Image.fromarray(half)
    x = apply_view(img, ViewParams(0.0, 0.0, 0.5, 1.0), 16, MEAN, STD)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, -2.0))  # (0 - 0.5) / 0.25
    right = apply_view(img, ViewParams(0.5, 0.0, 1.0, 1.0), 16, MEAN, STD)
    assert torch.allclose(right, torch.full_like(right, 2.0))
    full = eval_transform(img, 8, MEAN, STD)
    flipped = apply_view(img, ViewParams(0, 0, 1, 1, flip=True), 8, MEAN, STD)
    assert torch.allclose(full, flipped.flip(-1))
    assert full[0, 0, 0] < 0 < full[0, 0, -1]
    gray = apply_view(image(3, "L"), sample_view(0, "g", 1), 24, MEAN, STD)
    assert gray.shape == (3, 24, 24) and torch.equal(gray[0], gray[2])


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def test_labeled_images_train_eval_and_corrupt(tmp_path):
    folder, bad_files = make_folder(tmp_path), make_bad_files(tmp_path)
    table, _ = read_imagefolder(str(folder), split="train")
    torch.manual_seed(0)
    train = LabeledImages(table, 24, MEAN, STD, train=True, seed=0, cache=True)
    (x1, y1), (x2, _) = train[3], train[3]
    assert x1.shape == (3, 24, 24) and y1 == 1 and not torch.equal(x1, x2)
    ev = LabeledImages(table, 24, MEAN, STD, train=False)
    assert torch.equal(ev[0][0], ev[0][0]) and ev[0][0].shape == (3, 24, 24)
    bad = read_unlabeled_folder(str(bad_files))
    with pytest.raises(CorruptImageError, match="corrupt.jpg"):
        LabeledImages(bad, 24, MEAN, STD, train=False, cache=True)
    with pytest.raises(CorruptImageError, match="corrupt.jpg"):
        LabeledImages(bad, 24, MEAN, STD, train=False)[1]


def test_view_images_apply_stored_view_and_skip_unreadable(tmp_path):
    bad_files = make_bad_files(tmp_path)
    table = read_unlabeled_folder(str(bad_files))
    p = sample_view(5, "good.png", 2)
    rows = table.append_column("x0", pa.array([p.x0] * 3, pa.float32()))
    for k in ("y0", "x1", "y1"):
        rows = rows.append_column(k, pa.array([getattr(p, k)] * 3, pa.float32()))
    rows = rows.append_column("flip", pa.array([p.flip] * 3))
    rows = rows.append_column(
        "logits", pa.array([[0.1, 0.2], [1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))
    )
    ds = ViewImages(rows, 16, MEAN, STD, targets=("logits",))
    item = ds[0]
    expected = apply_view(load_image_strict(str(bad_files / "good.png")), p, 16, MEAN, STD)
    assert torch.equal(item["x"], expected) and item["index"] == 0
    assert torch.allclose(item["logits"], torch.tensor([0.1, 0.2]))
    assert ds[1] is None and ds[2] is None
    batch = collate_skip_none([ds[i] for i in range(3)])
    assert batch["x"].shape == (1, 3, 16, 16) and batch["index"].tolist() == [0]
    assert collate_skip_none([None, None]) is None


# --------------------------------------------------------------------------------------------
# Generic pool
# --------------------------------------------------------------------------------------------
def test_generic_pool_is_deterministic(tmp_path):
    a = build_generic_pool(str(tmp_path / "a" / "pool.parquet"), 6, size=24, seed=3)
    b = build_generic_pool(str(tmp_path / "b"), 6, size=24, seed=3)
    c = build_generic_pool(str(tmp_path / "c"), 6, size=24, seed=4)
    assert a.num_rows == 6 and a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    png = [
        pq.read_table(s.column("source")[0].as_py().split("#")[0])["png"].to_pylist()
        for s in (a, b, c)
    ]
    assert png[0] == png[1] and png[0] != png[2]
    assert not [f for f in os.listdir(tmp_path / "a") if f != "pool.parquet"]  # no temporaries
    imgs = load_images(a.column("source").to_pylist())
    assert all(i.size == (24, 24) and i.mode == "RGB" for i in imgs)
    assert read_parquet_images(str(tmp_path / "b")).num_rows == 6


# --------------------------------------------------------------------------------------------
# Real data and import hygiene
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(FASHION), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train = read_idx(FASHION, "train")
    assert train.num_rows == 60000
    assert class_counts(train) == {c: 6000 for c in range(10)}
    img = load_images([train.column("source")[59999].as_py()])[0]
    assert img.mode == "L" and img.size == (28, 28)


def test_data_library_never_imports_ray():
    code = "import sys, ktray.data; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_order_for_reading_groups_container_rows_and_scatters_class_folders():
    """Rows of a container file stay together in row order (sequential reads); image files of
    their own go where a hash of the name puts them, not in path order, which would be class
    by class for an ImageFolder (distillation reads the logits table in ranges of thousands of
    rows: batches of one class or two)."""
    import pyarrow as pa

    from ktray.predict import order_for_reading

    files = [f"/d/train/class{c}/{i}.png" for c in range(4) for i in range(50)]
    container = [f"/g/shard.parquet#{r}" for r in (7, 2, 11, 0)] + ["/g/a.tar#x.jpg"]
    sources = files + container
    table = pa.table({"image_id": [str(i) for i in range(len(sources))], "source": sources})
    got = order_for_reading(table)["source"].to_pylist()
    assert sorted(got) == sorted(sources)
    rows = [s for s in got if s.startswith("/g/shard")]
    first = got.index(rows[0])
    assert got[first : first + 4] == [f"/g/shard.parquet#{r}" for r in (0, 2, 7, 11)]
    classes = [s.split("/")[3] for s in got if s.startswith("/d/")]
    same = np.mean([a == b for a, b in zip(classes, classes[1:])])
    assert same < 0.5  # path order: 0.985; shuffled: ~0.25
    # stable: the same rows in any input order come out in the same order
    assert (
        order_for_reading(table.take(pa.array(range(len(sources))[::-1])))["source"].to_pylist()
        == got
    )
