"""Curation for segmentation tasks: the labeled images' crops query the gallery, train + test
images are protected by the exact leak scan, and the curated set goes through the dense logits
pass, dense distillation and finetuning like ``in_domain`` does.

The encoder is the teacher's random-weight ``test_vit`` (seeded): the generated scenes' crops
reach a cosine of at most 0.961 with a test image, the planted copy (test image s1 resized to
48 px, in the unlabeled folder that is the gallery) 0.9975: the leak threshold is 0.99."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_helpers import BASE
from PIL import Image, ImageDraw
from test_seg_parquet import folder_to_parquet

from ktray import cli, storage
from ktray.config import load_config
from ktray.data import columns as C
from ktray.data.segmentation import MASK
from ktray.data.sources import load_images
from ktray.pipeline import curation, curation_summary
from ktray.pipeline.curation_report import write_report
from ktray.pipeline.tasks import prepare_task, read_transfer

LEAK = "unlabeled/zz_test_copy"  # the planted copy of a test image, in the gallery
LEAK_THRESHOLD = "curate.dedup_threshold=0.99"  # copy: 0.9975, other images at most 0.961
TINY_SEG = [
    "teacher.backbone=test_vit",
    "teacher.pretrained=false",
    "teacher.img_size=32",
    "teacher.epochs=2",
    "teacher.probe_views=2",
    "student.arch=test_resnet",
    "student.img_size=32",
    "logits.views=2",
    "logits.dense_size=4",
    "logits.batch_size=8",
    "distill.steps=3",
    "distill.batch_size=4",
    "distill.warmup_steps=1",
    "finetune.steps=2",
    "finetune.scratch_steps=2",
    "finetune.batch_size=4",
    "finetune.warmup_steps=1",
]


def _scene(rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, np.ndarray]:
    """A random rectangle (class 1) or ellipse (class 2) on a random background + its mask."""
    bg = tuple(int(v) for v in rng.integers(0, 80, 3))
    img, mask = Image.new("RGB", (size, size), bg), Image.new("L", (size, size), 0)
    cls = int(rng.integers(1, 3))
    x0, y0 = (int(v) for v in rng.integers(0, size // 3, 2))
    box = [x0, y0, x0 + size // 2 + int(rng.integers(0, size // 4)), y0 + size // 2]
    fill = tuple(int(v) for v in rng.integers(120, 255, 3))
    for d, f in ((ImageDraw.Draw(img), fill), (ImageDraw.Draw(mask), cls)):
        (d.rectangle if cls == 1 else d.ellipse)(box, fill=f)
    m = np.asarray(mask).copy()
    m[0, 0] = 255  # an ignored pixel
    return img, m


def make_seg_task(root: str, train: int = 6, test: int = 4, unlabeled: int = 20) -> str:
    """A segfolder task whose unlabeled/ folder (the gallery) holds a copy of a test image."""
    rng = np.random.default_rng(3)
    for split, n in (("train", train), ("test", test)):
        for k in range(n):
            img, mask = _scene(rng)
            for sub, obj in (("images", img), ("masks", Image.fromarray(mask))):
                os.makedirs(os.path.join(root, sub, split), exist_ok=True)
                obj.save(os.path.join(root, sub, split, f"s{k}.png"))
    os.makedirs(os.path.join(root, "unlabeled"))
    for k in range(unlabeled):
        _scene(rng)[0].save(os.path.join(root, "unlabeled", f"u{k:02d}.png"))
    test_img = Image.open(os.path.join(root, "images", "test", "s1.png")).convert("RGB")
    test_img.resize((48, 48)).save(os.path.join(root, f"{LEAK}.png"))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("background\nrect\nellipse\n")
    return root


def seg_cfg(root: str, out: str, *extra: str):
    args = [f"data.root={root}", f"out={out}", *TINY_SEG, *BASE, LEAK_THRESHOLD, *extra]
    return load_config("segfolder", args)


def _task(kind: str, tmp_path) -> tuple[object, int, int, int]:
    """A small task of ``kind``: (config, train, test, gallery images)."""
    out = str(tmp_path / "out")
    if kind == "fashion_mosaic":
        sizes = ["data.mosaic_train=4", "data.mosaic_unlabeled=6", "data.mosaic_test=3"]
        return load_config("demo_segmentation", [f"out={out}", *sizes]), 4, 3, 6
    root = make_seg_task(str(tmp_path / "seg"))
    if kind == "segfolder":
        return seg_cfg(root, out), 6, 4, 21
    pq_root = str(tmp_path / "pq")
    for split in ("train", "test"):
        folder_to_parquet(root, pq_root, split)
    blobs = [open(os.path.join(root, "unlabeled", f), "rb").read() for f in ("u00.png", "u01.png")]
    pq.write_table(pa.table({"jpg": blobs}), os.path.join(pq_root, "unlabeled-0.parquet"))
    return seg_cfg(pq_root, out, "data.kind=segparquet"), 6, 4, 2


@pytest.mark.parametrize("kind", ["segfolder", "segparquet", "fashion_mosaic"])
def test_seg_image_sets_query_train_and_protect_test(kind, tmp_path):
    """queries = the labeled (train) images, protected = val + test, gallery = the unlabeled
    images; no mask is carried into retrieval, and every set's images decode."""
    cfg, n_train, n_test, n_gallery = _task(kind, tmp_path)
    info = prepare_task(cfg)
    queries, protected = curation.image_sets(info)
    train = storage.read_parquet(info["outputs"]["train"])
    test = storage.read_parquet(info["outputs"]["test"])
    assert MASK in train.column_names and MASK in test.column_names
    assert queries[C.IMAGE_ID].to_pylist() == train[C.IMAGE_ID].to_pylist()
    assert protected[C.SOURCE].to_pylist() == test[C.SOURCE].to_pylist()
    assert (len(queries), len(protected)) == (n_train, n_test)
    for t in (queries, protected):
        assert t.column_names == [curation.GALLERY_INDEX, C.IMAGE_ID, C.SOURCE]
        assert t[curation.GALLERY_INDEX].to_pylist() == list(range(len(t)))
    gallery = curation.gallery_table(cfg)
    assert len(gallery) == n_gallery
    assert set(gallery[curation.ORIGIN].to_pylist()) == {curation.IN_DOMAIN}
    assert not set(gallery[C.SOURCE].to_pylist()) & set(protected[C.SOURCE].to_pylist())
    some = [*queries[C.SOURCE].to_pylist()[:2], *protected[C.SOURCE].to_pylist()[:2]]
    assert all(img is not None for img in load_images(some + gallery[C.SOURCE].to_pylist()[:2]))
    if kind == "segfolder":
        assert LEAK in gallery[C.IMAGE_ID].to_pylist()  # the planted copy of test/s1


def test_seg_curation_summary_and_report_without_labels(tmp_path):
    """The manifest's account and the report of a segmentation task (mask column, no labels)."""
    root = make_seg_task(str(tmp_path / "seg"), unlabeled=6)
    info = prepare_task(seg_cfg(root, str(tmp_path / "out")))
    train = storage.read_parquet(info["outputs"]["train"])
    assert MASK in train.column_names and set(train["label"].to_pylist()) == {-1}
    queries = curation.indexed(train)
    gallery = curation.gallery_table(seg_cfg(root, str(tmp_path / "out")))
    # 2 images for each of the first 3 queries, 1 for the 4th: 3 short queries, 7 images
    picks = {"image_id": [0, 1, 2, 3, 4, 5, 6], "query_id": [], "rank": [], "score": []}
    for q, n in (("train/s0", 2), ("train/s1", 2), ("train/s2", 2), ("train/s3", 1)):
        picks["query_id"] += [q] * n
        picks["rank"] += list(range(n))
        picks["score"] += [0.9] * n
    transfer = curation.transfer_table(gallery, picks)
    s = curation_summary.summary(gallery, queries, transfer, {}, set(), 2)
    assert s["queries"] == 6 and s["unique_images"] == 7
    assert s["per_query_counts"] == {"0": 2, "1": 1, "2": 3}
    assert s["shortfall"]["queries"] == 3 and s["shortfall"]["images"] == 5
    assert s["in_domain_fraction"] == 1.0
    out = str(tmp_path / "report")
    os.makedirs(out)
    files = write_report(out, queries, transfer, s, 3, curation.origins_of(gallery, transfer), {})
    for name in ("report.png", "scores.png", "report.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert set(files) == {"report_png", "scores_png", "report_md"}
    md = open(os.path.join(out, "report.md")).read()
    assert "6 queries x 2 images requested: **7** distinct" in md
    assert "| in-domain fraction of the selection | 1.000 |" in md


@pytest.mark.slow
def test_seg_task_at_curated_end_to_end(tmp_path, ray_local):
    """``methods=[task@curated]`` on a segfolder task: curate (leak scan against the test
    images) -> dense logits of the curated set -> dense distillation -> finetuning -> mIoU."""
    root = make_seg_task(str(tmp_path / "seg"))
    out = str(tmp_path / "out")
    args = ["run", "segfolder", f"data.root={root}", f"out={out}", *TINY_SEG, *BASE, LEAK_THRESHOLD]
    assert cli.main([*args, "methods=[task@curated]", "curate.images_per_query=2"]) == 0
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["images"] == {"queries": 6, "protected": 4, "gallery": 21}
    # the planted copy of test image s1 is removed by the exact scan, named in the manifest
    assert LEAK in m["excluded"]["examples"]
    assert {"gallery_image": LEAK, "protected_image": "test/s1"}.items() <= next(
        p for p in m["leak_check"]["pairs"] if p["gallery_image"] == LEAK
    ).items()
    transfer = read_transfer(seg_cfg(root, out), "curated")
    ids = transfer["image_id"].to_pylist()
    assert LEAK not in ids and not any(i.startswith(("test/", "train/")) for i in ids)
    assert len(ids) == len(set(ids)) == m["rows"]
    assert m["rows"] == 6 * 2 - m["shortfall"]["images"]
    assert m["rows"] == sum(int(k) * v for k, v in m["per_query_counts"].items())
    # dense teacher targets for exactly the curated images: C x s x s float16 per view
    logits = storage.read_parquet(os.path.join(out, "logits", "curated"))
    assert sorted(set(logits["image_id"].to_pylist())) == sorted(ids)
    assert len(logits) == 2 * len(ids)
    assert logits.schema.field("logits").type == pa.list_(pa.float16(), 3 * 4 * 4)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["task_type"] == "segmentation"
    r = results["methods"]["task@curated"]
    ft = json.load(open(os.path.join(out, "finetune", "task@curated", "manifest.json")))
    assert 0.0 <= r["test_miou"] <= 1.0 and r["test_miou"] == ft["test_miou"]
    assert len(r["per_class_iou"]) == 3 and "distill_test_miou" in r
    dm = json.load(open(os.path.join(out, "distill", "task@curated", "manifest.json")))
    assert dm["uses_logits"] and dm["transfer_rows"] == len(logits)
    assert r["distill_test_miou"] == dm["test_miou"] and r["transfer_images"] == len(ids)
