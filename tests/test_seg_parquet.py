"""Segmentation data given as Parquet (``data.kind=segparquet``): image bytes + PNG mask bytes
per row, read by row group, checked with one-line errors naming the file and row."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_segmentation import make_segfolder

from ktray.config import load_config
from ktray.data import seg_parquet
from ktray.data import segmentation as seg
from ktray.errors import KtrayError
from ktray.pipeline import segtask


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def folder_to_parquet(folder, out, split, mask_column="mask", row_group_size=2, edit=None):
    """The segfolder split as one Parquet file (``image`` + ``mask_column`` bytes, ``key``)."""
    table = seg.read_segfolder_split(folder, split)
    images, masks = [], []
    for k, (src, m) in enumerate(zip(table["source"].to_pylist(), table["mask"].to_pylist())):
        mask = np.asarray(Image.open(m))
        if edit is not None:
            mask = edit(k, mask)
        images.append(open(src, "rb").read())
        masks.append(None if mask is None else _png(mask))
    data = pa.table(
        {"key": [f"{split}{k}" for k in range(len(images))], "image": images, mask_column: masks}
    )
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{split}.parquet")
    pq.write_table(data, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def folder(tmp_path):
    return make_segfolder(tmp_path / "d", n_train=5, n_test=3, n_unl=4)


def test_parquet_masks_equal_the_folder_masks_across_row_groups(folder, tmp_path):
    path = folder_to_parquet(folder, str(tmp_path / "pq"), "train", row_group_size=2)
    table = seg.read_segparquet_split(path, "mask")
    ref = seg.read_segfolder_split(folder, "train")
    assert table["mask"].to_pylist() == [f"{path}#{r}:mask" for r in range(5)]
    assert table["label"].to_pylist() == [-1] * 5 and table["image_id"][0].as_py() == "train0"
    # rows 0..4 over 3 row groups: each mask is its own row's, in a shuffled request order
    order = [4, 1, 3, 0, 2]
    got = seg.load_masks([table["mask"][i].as_py() for i in order])
    want = seg.load_masks([ref["mask"][i].as_py() for i in order])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    top, counts = seg.check_masks(table, 3, 255, batch=2)
    top_ref, counts_ref = seg.check_masks(ref, 3, 255)
    assert top == top_ref == 2 and counts.tolist() == counts_ref.tolist()
    ds = seg.SegImages(table, 32, (0, 0, 0), (1, 1, 1), train=False)
    ds_ref = seg.SegImages(ref, 32, (0, 0, 0), (1, 1, 1), train=False)
    for i in range(5):
        (x, m), (xr, mr) = ds[i], ds_ref[i]
        assert torch.equal(x, xr) and torch.equal(m, mr)


def test_bad_parquet_masks_name_the_file_and_row(folder, tmp_path):
    out = str(tmp_path / "pq")

    def bad(kind):
        def edit(k, mask):
            if k != 3:
                return mask
            return {"id": np.full_like(mask, 7), "size": mask[:16], "null": None}[kind]

        return seg.read_segparquet_split(folder_to_parquet(folder, out, "train", edit=edit), "mask")

    with pytest.raises(KtrayError, match=r"train\.parquet row 3 \(column 'mask'\) has class id 7"):
        seg.check_masks(bad("id"), 3, 255)
    with pytest.raises(KtrayError, match=r"train\.parquet row 3 \(column 'mask'\) is 32x16 but"):
        seg.check_masks(bad("size"), 3, 255)
    with pytest.raises(KtrayError, match=r"train\.parquet row 3 \(column 'mask'\) is null"):
        seg.check_masks(bad("null"), 3, 255)
    path = folder_to_parquet(folder, out, "train", mask_column="annotation")
    with pytest.raises(KtrayError, match=r"no mask column 'mask' in .*train\.parquet.*annotation"):
        seg.read_segparquet_split(path, "mask")
    assert len(seg.read_segparquet_split(path, "annotation")) == 5
    with pytest.raises(KtrayError, match="no image bytes column .* besides the mask column"):
        seg.read_segparquet_split(path, "image")


def test_segparquet_task_reads_splits_unlabeled_and_class_names(folder, tmp_path):
    root = str(tmp_path / "pq")
    folder_to_parquet(folder, root, "train")
    folder_to_parquet(folder, root, "test")
    names = [f"n{i}" for i in range(3)]
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    cfg = load_config(None, ["data.kind=segparquet", f"data.root={root}", f"out={tmp_path}/o"])
    assert not segtask.has_unlabeled(cfg)
    unl = seg.read_unlabeled(folder)
    blobs = [open(s, "rb").read() for s in unl["source"].to_pylist()]
    pq.write_table(pa.table({"jpg": blobs}), os.path.join(root, "unlabeled-0.parquet"))
    train, test, unlabeled, got = segtask.read_splits(cfg)
    assert (len(train), len(test), len(unlabeled), got) == (5, 3, 4, names)
    assert "mask" not in unlabeled.column_names
    os.remove(os.path.join(root, "test.parquet"))
    with pytest.raises(KtrayError, match=r"no test\*\.parquet files"):
        segtask.check_layout(cfg)


def test_parquet_mask_strings_round_trip():
    ref = seg_parquet.mask_ref("s3://b/x/train-0.parquet", 12, "seg:mask")
    assert seg_parquet.parse_mask_ref(ref) == ("s3://b/x/train-0.parquet", 12, "seg:mask")
    assert seg_parquet.parse_mask_ref("/d/masks/train/a#1.png") is None
    assert seg_parquet.describe(ref) == "s3://b/x/train-0.parquet row 12 (column 'seg:mask')"


@pytest.mark.servers
def test_segparquet_on_s3(folder, tmp_path, s3_server):
    path = folder_to_parquet(folder, str(tmp_path / "pq"), "train")
    uri = s3_server.url("segpq", "train.parquet")
    s3_server.fs.put(path, uri.removeprefix("s3://"))
    table = seg.read_segparquet_split(uri, "mask")
    assert table["mask"][2].as_py() == f"{uri}#2:mask"
    top, _ = seg.check_masks(table, 3, 255)
    assert top == 2
    local = seg.load_masks(seg.read_segparquet_split(path, "mask")["mask"].to_pylist())
    for a, b in zip(seg.load_masks(table["mask"].to_pylist()), local):
        np.testing.assert_array_equal(a, b)
