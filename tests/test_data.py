"""Tests of ktray.data: readers, source resolution, task assembly, views, datasets, generic pool."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
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
    read_gallery,
    read_idx,
    read_imagefolder,
    read_parquet_images,
    read_unlabeled_folder,
    read_webdataset,
    sample_view,
    split_validation,
    subsample_per_class,
)
from ktray.errors import CorruptImageError, KtrayError

FASHION = "/usr/share/datasets/fashion-mnist"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(i: int, mode: str = "RGB", size: int = 32) -> Image.Image:
    rng = np.random.default_rng(i)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    data = _encode(_image(99), "JPEG")
    return data[: len(data) // 2]


@pytest.fixture()
def folder(tmp_path):
    """root/{train,test}/{cat,dog}/ with RGB and grayscale PNG / JPEG files."""
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                mode = "L" if i == 0 else "RGB"
                ext = ("png", "JPG")[i % 2]
                _image(10 * c + i, mode).save(
                    d / f"{i}.{ext}", format="PNG" if ext == "png" else "JPEG"
                )
            (d / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def bad_files(tmp_path):
    d = tmp_path / "bad"
    (d / "sub").mkdir(parents=True)
    _image(1).save(d / "good.png")
    (d / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    (d / "sub" / "truncated.jpg").write_bytes(_truncated_jpeg())
    return d


def _write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture()
def idx_folder(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    return d


# --------------------------------------------------------------------------------------------
# Readers and source resolution
# --------------------------------------------------------------------------------------------
def test_imagefolder_table_labels_and_class_names(folder):
    table, names = read_imagefolder(str(folder), split="train")
    assert names == ["cat", "dog"]
    assert table.schema.field("label").type == pa.int64()
    assert table.num_rows == 6
    assert table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert table.column("image_id").to_pylist()[0] == "train/cat/0.png"
    test, test_names = read_imagefolder(str(folder), split="test", class_names=["cat", "dog"])
    assert test_names == ["cat", "dog"] and test.num_rows == 4
    images = load_images(table.column("source").to_pylist())
    assert all(img is not None and img.size == (32, 32) for img in images)
    assert images[0].mode == "L" and images[1].mode == "RGB"


def test_imagefolder_errors(folder, tmp_path):
    with pytest.raises(KtrayError, match="not found"):
        read_imagefolder(str(tmp_path / "missing"))
    with pytest.raises(KtrayError, match="no class folders"):
        read_imagefolder(str(folder / "train" / "cat"))
    with pytest.raises(KtrayError, match="'dog'"):
        read_imagefolder(str(folder), split="test", class_names=["cat"])
    (folder / "train" / "emu").mkdir()
    (folder / "train" / "emu" / "readme.txt").write_text("x")
    with pytest.raises(KtrayError, match="emu"):
        read_imagefolder(str(folder), split="train")


def test_unlabeled_folder_and_corrupt_images(bad_files):
    table = read_unlabeled_folder(str(bad_files))
    assert table.column("image_id").to_pylist() == [
        "good.png",
        "sub/corrupt.jpg",
        "sub/truncated.jpg",
    ]
    assert set(table.column("label").to_pylist()) == {-1}
    sources = table.column("source").to_pylist() + [str(bad_files / "missing.png")]
    good, corrupt, truncated, missing = load_images(sources)
    assert good is not None and good.mode == "RGB"
    assert corrupt is None and truncated is None and missing is None
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        load_image_strict(sources[2])


def test_parquet_img2dataset_and_hf_layouts(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    imgs = [_image(i) for i in range(4)]
    pq.write_table(
        pa.table(
            {
                "key": ["000", "001", "002", "003"],
                "jpg": [_encode(imgs[0], "JPEG"), None, b"garbage", _encode(imgs[3], "PNG")],
                "status": ["success", "failed_to_download", "success", "success"],
                "cls": [1, 2, None, 0],
            }
        ),
        d / "shard0.parquet",
        row_group_size=2,
    )
    table = read_parquet_images(str(d / "shard0.parquet"), label_column="cls")
    assert table.column("image_id").to_pylist() == ["000", "002", "003"]
    assert table.column("label").to_pylist() == [1, -1, 0]
    loaded = load_images(table.column("source").to_pylist())
    assert loaded[0].size == (32, 32) and loaded[1] is None
    assert np.array_equal(np.asarray(loaded[2]), np.asarray(imgs[3]))

    hf = tmp_path / "hf.parquet"
    struct_col = pa.array([{"bytes": _encode(imgs[1], "PNG"), "path": None}])
    pq.write_table(pa.table({"image": struct_col}), hf)
    t2 = read_parquet_images(str(hf))
    assert t2.to_pylist() == [{"image_id": "hf/0", "source": f"{hf}#0", "label": -1}]
    assert np.array_equal(np.asarray(load_images([f"{hf}#0"])[0]), np.asarray(imgs[1]))
    assert load_images([f"{hf}#7"]) == [None]
    with pytest.raises(KtrayError, match="label column"):
        read_parquet_images(str(hf), label_column="cls")
    pq.write_table(pa.table({"caption": ["x"]}), d / "noimg.parquet")
    with pytest.raises(KtrayError, match="noimg.parquet"):
        read_parquet_images(str(d))


def _parquet_task(root, train_labels, test_labels) -> str:
    os.makedirs(root, exist_ok=True)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        pq.write_table(
            pa.table(
                {"jpg": [_encode(_image(i), "PNG") for i in range(len(labels))], "label": labels}
            ),
            os.path.join(root, f"{split}-0.parquet"),
        )
    return str(root)


def test_parquet_labels_names_and_numbering(tmp_path):
    from ktray.config import load_config
    from ktray.pipeline.tasks import prepare_task

    def prepare(root, *overrides):
        return prepare_task(
            load_config(
                "tiny",
                [
                    "data.kind=parquet",
                    f"data.root={root}",
                    f"out={tmp_path}/out-{os.path.basename(root)}",
                    "data.generic_images=0",
                    *overrides,
                ],
            )
        )

    names = prepare(_parquet_task(tmp_path / "s", ["dog", "cat", "dog", "emu"], ["cat", "emu"]))
    assert names["class_names"] == ["cat", "dog", "emu"] and names["num_classes"] == 3
    test = pq.read_table(names["outputs"]["test"])
    assert test.column("label").to_pylist() == [0, 2]
    with pytest.raises(
        KtrayError,
        match=r"label 'yak' in column 'label' of .*test-0.parquet: "
        "not one of the 3 class names",
    ):
        prepare(_parquet_task(tmp_path / "y", ["dog", "cat", "emu"], ["yak"]))
    with pytest.raises(
        KtrayError,
        match=r"1 of 4 classes have no training image .*"
        r"\(first: 0 = '0'\); labels must number the classes "
        "from 0",
    ):
        prepare(_parquet_task(tmp_path / "one", [1, 2, 3, 1], [1, 2]))
    given = prepare(_parquet_task(tmp_path / "g", [0, 1, 2, 0], [2]), "data.class_names=[a,b,c]")
    assert given["class_names"] == ["a", "b", "c"]
    with pytest.raises(KtrayError, match=r"label 3 in column 'label' of .* must be 0..2"):
        prepare(_parquet_task(tmp_path / "o", [0, 1, 3], [0]), "data.class_names=[a,b,c]")
    root = _parquet_task(tmp_path / "f", ["x", "y", "x"], ["y"])
    open(os.path.join(root, "classes.txt"), "w").write("y\nx\n")
    assert prepare(root)["class_names"] == ["y", "x"]
    with pytest.raises(KtrayError, match="give data.class_names"):
        read_parquet_images(os.path.join(root, "train-0.parquet"), label_column="label")
    with pytest.raises(KtrayError, match="label 2.5 in column 'label' .* is neither an integer"):
        prepare(_parquet_task(tmp_path / "fl", [0.0, 1.0, 2.5], [1.0]))


def _write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_reader_and_members(tmp_path):
    a, b = _image(1), _image(2, "L")
    _write_tar(
        tmp_path / "shard-000.tar",
        {
            "s/000.jpg": _encode(a, "JPEG"),
            "s/000.cls": b"3",
            "s/001.png": _encode(b, "PNG"),
            "s/001.cls": b"1\n",
            "s/002.txt": b"caption only",
            "s/002.cls": b"0",
        },
    )
    _write_tar(tmp_path / "shard-001.tar", {"s/003.webp": _encode(a, "WEBP"), "s/003.cls": b"0"})
    table = read_webdataset(str(tmp_path / "shard-{000..001}.tar"), label_ext="cls")
    assert table.column("image_id").to_pylist() == ["s/000", "s/001", "s/003"]
    assert table.column("label").to_pylist() == [3, 1, 0]
    assert table.column("source").to_pylist()[1] == f"{tmp_path}/shard-000.tar#s/001.png"
    imgs = load_images(table.column("source").to_pylist() + [f"{tmp_path}/shard-000.tar#nope"])
    assert [i is None for i in imgs] == [False, False, False, True]
    assert np.array_equal(np.asarray(imgs[1]), np.asarray(b))
    assert read_gallery(str(tmp_path)).num_rows == 3


def test_idx_reader(idx_folder, tmp_path):
    train, test = read_idx(str(idx_folder), "train"), read_idx(str(idx_folder), "test")
    assert train.num_rows == 12 and test.num_rows == 5
    assert train.column("label").to_pylist() == [i % 3 for i in range(12)]
    img = load_images([train.column("source")[4].as_py()])[0]
    assert img.mode == "L" and img.size == (28, 28)
    expected = np.random.default_rng(0).integers(0, 256, (12, 28, 28)).astype(np.uint8)[4]
    assert np.array_equal(np.asarray(img), expected)
    with pytest.raises(KtrayError, match="t10k-images-idx3-ubyte"):
        read_idx(str(tmp_path), "test")


def test_read_gallery_dispatch(folder, tmp_path):
    table = read_gallery(str(folder))
    assert table.num_rows == 10 and set(table.column("label").to_pylist()) == {-1}
    with pytest.raises(KtrayError):
        read_gallery(str(tmp_path / "nothing-here"))


def test_memory_filesystem_uris():
    fs = fsspec.filesystem("memory")
    for cls in ("a", "b"):
        fs.pipe(f"/ktray-test/{cls}/x.png", _encode(_image(ord(cls)), "PNG"))
    table, names = read_imagefolder("memory://ktray-test")
    assert names == ["a", "b"]
    src = table.column("source")[0].as_py()
    assert src.startswith("memory://") and src.endswith("/ktray-test/a/x.png")
    assert all(img is not None for img in load_images(table.column("source").to_pylist()))
    with fs.open("/ktray-test-pq/part-0.parquet", "wb") as f:
        pq.write_table(pa.table({"png": [_encode(_image(5), "PNG")]}), f)
    rows = read_parquet_images("memory://ktray-test-pq")
    assert rows.column("image_id").to_pylist() == ["part-0/0"]
    assert load_images(rows.column("source").to_pylist())[0].size == (32, 32)


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
    gray = apply_view(_image(3, "L"), sample_view(0, "g", 1), 24, MEAN, STD)
    assert gray.shape == (3, 24, 24) and torch.equal(gray[0], gray[2])


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def test_labeled_images_train_eval_and_corrupt(folder, bad_files):
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


def test_view_images_apply_stored_view_and_skip_unreadable(bad_files):
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
