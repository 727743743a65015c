"""`ktray curate` keeps re-encoded, cropped copies of test images out of the transfer set under
a lossy IVF-PQ index (EfficientNet-Lite0 embeddings of offline photos; exact re-check)."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from curate_helpers import check_balanced, curate_cli
from PIL import Image

LITE0_DUP = 0.85
"""EfficientNet-Lite0 (ImageNet, shipped offline) at 64 px: re-encoded, 2-4 % cropped copies of
photo crops score 0.92-0.98 with their originals, crops of other photos at most ~0.6."""


def _jpeg_crop_copy(src: str, dst: str, border: float, quality: int) -> None:
    """A near copy as the web makes them: a few percent cut off each side, resized, saved as
    a lossy JPEG."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    dx, dy = round(border * w), round(border * h)
    img.crop((dx, dy, w - dx, h - dy)).resize((112, 112)).save(dst, "JPEG", quality=quality)


@pytest.mark.ray
def test_curate_keeps_reencoded_cropped_test_copies_out_under_ivfpq(tiny_task, tmp_path, ray_local):
    """Near copies of test images (cropped 2-4 %, re-encoded as JPEG) planted in a gallery
    never reach the transfer set, even with a lossy IVF-PQ index forced: every approximate
    hit near a test image is re-checked with exact cosine on the stored embeddings. The
    quota needs every gallery image but the copies, so a copy let through would be chosen."""
    from ktray.data.generic import offline_photos, random_crop

    photos = offline_photos()
    rng = np.random.default_rng(0)
    tests = []
    for c in range(3):  # the task's test images become crops of photos 0-5
        for i in range(4):
            path = os.path.join(tiny_task, "test", f"class{c}", f"{i}.png")
            random_crop(photos[(4 * c + i) % 6], rng, 96, scale=(0.05, 0.3)).save(path)
            tests.append(f"class{c}/{i}.png")
    root = str(tmp_path / "gallery")
    os.makedirs(os.path.join(root, "web"))
    os.makedirs(os.path.join(root, "dup"))
    for i in range(100):  # unrelated web images: crops of the other photos
        img = random_crop(photos[6 + i % (len(photos) - 6)], rng, 96, scale=(0.05, 0.5))
        img.save(os.path.join(root, "web", f"{i:03d}.png"))
    planted = {}
    for j, (border, quality) in enumerate([(0.03, 70), (0.04, 60), (0.02, 80), (0.04, 65)]):
        name = f"dup/copy{j}.jpg"
        src = tests[3 * j]
        _jpeg_crop_copy(
            os.path.join(tiny_task, "test", src), os.path.join(root, name), border, quality
        )
        planted[name] = src
    out = str(tmp_path / "out")
    args = [
        f"curate.gallery={root}",
        "curate.images_per_query=4",  # 96 of the 100 web images
        "curate.index=IVF4,PQ16x4",
        "curate.target_recall=0.5",
        "curate.encoder=efficientnet_lite0",
        "curate.img_size=64",
        f"curate.dedup_threshold={LITE0_DUP}",
    ]
    assert curate_cli(tiny_task, out, *args) == 0
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["index_type"] == "IVF4,PQ16x4" and m["index"]["factory"] == "IVF4,PQ16x4"
    assert m["search_actors"] == 1  # one per node
    assert m["index"]["score_error"] > 0.01  # a lossy index: its scores are not the cosine
    transfer = pq.read_table(os.path.join(out, "curate", "transfer_set.parquet"))
    check_balanced(transfer, 24, 4)
    assert not set(transfer["image_id"].to_pylist()) & set(planted)
    leak = m["leak_check"]
    assert {x["gallery_image"]: x["protected_image"] for x in leak["pairs"]} == planted
    assert leak["images"] == m["excluded"]["images"] == 4
    assert leak["method"] == "exact scan" and leak["gallery_vectors"] == m["crops"]["gallery"]
    assert leak["pairs_above_threshold"] >= 4
    assert all(x["cosine"] > LITE0_DUP for x in leak["pairs"])
    report = open(os.path.join(out, "curate", "report.md")).read()
    assert "| gallery image | near copy of | exact cosine |" in report
    assert all(f"| {name} | {src} |" in report for name, src in planted.items())
    mem = m["index"]["memory"]
    assert mem["peak_rss_gib"] > 0 and mem["index_gib"] > 0 and mem["budget_gb"] == 4.0
