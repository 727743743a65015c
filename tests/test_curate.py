"""`ktray curate`: query-balanced crop retrieval into a transfer set, on a tiny generated task.

The encoder is the tiny config's random-weight ``test_vit`` (seeded, so every actor and run
embeds alike). Its embeddings of the generated images are all close: gallery crops reach a
cosine of ~0.995 with test images, the planted near duplicate (a resized copy of a test image)
~0.999, so the near-duplicate threshold is 0.997.
"""

import io as _io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagegen import draw
from PIL import Image

from ktray import cli, storage
from ktray.config import load_config
from ktray.pipeline.tasks import read_transfer
from ktray.stages import curate as curate_stage

BASE = [
    "curate.img_size=32",
    "curate.grid=1",
    "curate.scales=[0.6]",
    "curate.dedup_threshold=0.997",
    "curate.batch_size=32",
    "tracking.mlflow=false",
]
PLANTED = "dup/test_copy.png"


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [draw(i % 3, rng, 32) for i in range(n)]


def _png(img: Image.Image) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_gallery(root: str, task: str, n: int = 64) -> str:
    """n generated images, 3 unreadable image files, a text file, and a resized copy of a
    test image (a near duplicate that must never be selected)."""
    for i, img in enumerate(_images(n, seed=7)):
        d = os.path.join(root, f"g{i % 4}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{i}.png"))
    bad = os.path.join(root, "bad")
    os.makedirs(bad)
    whole = _png(_images(1, seed=8)[0])
    open(os.path.join(bad, "truncated.png"), "wb").write(whole[: len(whole) // 2])
    open(os.path.join(bad, "not_an_image.jpg"), "wb").write(b"hello, not a jpeg")
    open(os.path.join(bad, "empty.png"), "wb").write(b"")
    open(os.path.join(bad, "readme.txt"), "w").write("not listed: no image extension")
    os.makedirs(os.path.join(root, "dup"))
    test_img = Image.open(os.path.join(task, "test", "class1", "2.png")).convert("RGB")
    test_img.resize((48, 48)).save(os.path.join(root, PLANTED))
    return root


def _cfg(task, out, *extra):
    return load_config("tiny", [f"data.root={task}", f"out={out}", *BASE, *extra])


def _check_balanced(transfer: pa.Table, queries: int, per_query: int) -> None:
    ids = transfer["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == queries * per_query  # none assigned twice
    counts = {}
    for q, r in zip(transfer["query_id"].to_pylist(), transfer["rank"].to_pylist()):
        counts.setdefault(q, []).append(r)
    assert len(counts) == queries
    assert all(sorted(r) == list(range(per_query)) for r in counts.values())
    assert set(transfer["label"].to_pylist()) == {-1}


def test_curate_skips_corrupt_excludes_duplicates_deterministic_and_resumes(
    tiny_task, tmp_path, ray_local
):
    gallery = make_gallery(str(tmp_path / "gallery"), tiny_task)
    out = str(tmp_path / "out")
    cfg = _cfg(
        tiny_task,
        out,
        f"curate.gallery={gallery}",
        "curate.images_per_query=2",
        "curate.shard_rows=16",
    )
    m = curate_stage.run(cfg)
    assert m["images"] == {"queries": 24, "protected": 12, "gallery": 68}
    assert m["skipped_by_set"] == {"queries": 0, "protected": 0, "gallery": 3}
    assert m["skipped"] == 3
    assert m["shards"] == {"queries": 2, "protected": 1, "gallery": 5}
    assert m["computed_shards"] == 8
    assert m["crops"] == {"queries": 48, "protected": 12, "gallery": 130}
    assert m["index_type"] == "Flat" and m["vectors"] == 130
    assert m["flops"] > 0 and m["flops"] == pytest.approx(m["flops_per_crop"] * 190)
    assert PLANTED in m["excluded"]["examples"]
    assert m["shortfall"]["queries"] == 0 and m["per_query_counts"] == {"2": 24}
    assert m["in_domain_fraction"] is None  # a user gallery: origins unknown

    transfer = read_transfer(cfg, "curated")
    assert transfer.schema.names == ["image_id", "source", "label", "query_id", "rank", "score"]
    _check_balanced(transfer, 24, 2)
    assert PLANTED not in transfer["image_id"].to_pylist()
    assert not any(i.startswith("bad/") for i in transfer["image_id"].to_pylist())
    for name in ("report.png", "scores.png", "report.md", "index.faiss", "manifest.json"):
        assert os.path.exists(os.path.join(out, "curate", name)), name
    assert open(os.path.join(out, "curate", "report.png"), "rb").read(4) == b"\x89PNG"
    emb = pq.read_table(os.path.join(out, "curate", "embeddings", "gallery", "part-00000.parquet"))
    assert emb.schema.names == [
        "gallery_index",
        "image_id",
        "crop_id",
        "x0",
        "y0",
        "x1",
        "y1",
        "embedding",
    ]
    assert emb.schema.field("embedding").type.list_size == 64

    # a rerun with the same config reuses the finished run
    assert curate_stage.run(cfg)["finished_at"] == m["finished_at"]

    # determinism: a second run elsewhere selects the same images for the same queries
    cfg2 = _cfg(
        tiny_task,
        str(tmp_path / "out2"),
        f"curate.gallery={gallery}",
        "curate.images_per_query=2",
        "curate.shard_rows=16",
    )
    curate_stage.run(cfg2)
    assert read_transfer(cfg2, "curated").equals(transfer)

    # resume after a killed job: one gallery part file and the manifest were never written
    gdir = os.path.join(out, "curate", "embeddings", "gallery")
    before = pq.read_table(os.path.join(gdir, "part-00002.parquet"))
    os.remove(os.path.join(gdir, "part-00002.parquet"))
    os.remove(os.path.join(out, "curate", "manifest.json"))
    m3 = curate_stage.run(cfg)
    assert m3["computed_shards"] == 1 and m3["crops"] == m["crops"]
    assert pq.read_table(os.path.join(gdir, "part-00002.parquet")).equals(before)
    crop_ids = storage.read_parquet(gdir, columns=["crop_id"])["crop_id"].to_pylist()
    assert len(crop_ids) == len(set(crop_ids)) == 130  # no row written twice
    assert not [f for f in os.listdir(gdir) if ".tmp" in f]
    assert read_transfer(cfg, "curated").equals(transfer)

    # a smaller quota reuses the embeddings (nothing recomputed) and stays balanced
    m4 = curate_stage.run(
        _cfg(
            tiny_task,
            out,
            f"curate.gallery={gallery}",
            "curate.images_per_query=1",
            "curate.shard_rows=16",
        )
    )
    assert m4["computed_shards"] == 0 and m4["rows"] == 24


def _parquet_gallery(path: str, images: list[Image.Image]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = [_png(img) for img in images] + [b"\x89PNG\r\n truncated"]
    pq.write_table(pa.table({"key": [f"p{i:03d}" for i in range(len(rows))], "png": rows}), path)
    return path


def _tar_gallery(path: str, images: list[Image.Image]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate([_png(img) for img in images] + [b"not an image"]):
            for name, blob in ((f"w{i:03d}.png", data), (f"w{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, _io.BytesIO(blob))
    return path


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_curate_gallery_parquet_and_webdataset(kind, tiny_task, tmp_path, ray_local):
    images = _images(40, seed=11)
    if kind == "parquet":
        uri = _parquet_gallery(str(tmp_path / "g" / "shard-000.parquet"), images)
    else:
        uri = _tar_gallery(str(tmp_path / "g" / "shard-000.tar"), images)
    out = str(tmp_path / "out")
    assert (
        cli.main(
            [
                "curate",
                "tiny",
                f"data.root={tiny_task}",
                f"out={out}",
                *BASE,
                f"curate.gallery={uri}",
                "curate.images_per_query=1",
            ]
        )
        == 0
    )
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["images"]["gallery"] == 41 and m["skipped_by_set"]["gallery"] == 1
    transfer = pq.read_table(os.path.join(out, "curate", "transfer_set.parquet"))
    _check_balanced(transfer, 24, 1)
    prefix = "p" if kind == "parquet" else "w"
    assert all(i.startswith(prefix) for i in transfer["image_id"].to_pylist())
    assert all("#" in s for s in transfer["source"].to_pylist())


def test_curated_set_feeds_the_pipeline(tiny_task, tmp_path, ray_local):
    """The demo gallery (in-domain unlabeled + generic pool) through `ktray run`."""
    out = str(tmp_path / "out")
    assert (
        cli.main(
            [
                "run",
                "tiny",
                f"data.root={tiny_task}",
                f"out={out}",
                *BASE,
                "methods=[task@curated]",
                "curate.images_per_query=1",
            ]
        )
        == 0
    )
    results = json.load(open(os.path.join(out, "results.json")))
    assert 0.0 <= results["methods"]["task@curated"]["test_accuracy"] <= 1.0
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["gallery_origins"] == {"generic": 16, "in_domain": 24}
    assert 0.0 <= m["in_domain_fraction"] <= 1.0 and m["rows"] == 24
    lm = json.load(open(os.path.join(out, "logits", "curated", "manifest.json")))
    assert lm["images"] == 24 and lm["rows"] == 48  # tiny: 2 views per image
    # another curate setting: a new transfer set, and new teacher logits for exactly it
    args = [
        "tiny",
        f"data.root={tiny_task}",
        f"out={out}",
        *BASE,
        "curate.images_per_query=1",
        "curate.grid=0",
    ]
    assert cli.main(["curate", *args]) == 0
    assert cli.main(["logits", *args, "--transfer", "curated"]) == 0
    lm2 = json.load(open(os.path.join(out, "logits", "curated", "manifest.json")))
    assert lm2["config_hash"] != lm["config_hash"] and lm2["computed_shards"] == lm2["shards"]
    curated = set(
        pq.read_table(os.path.join(out, "curate", "transfer_set.parquet"))["image_id"].to_pylist()
    )
    assert (
        set(storage.read_parquet(os.path.join(out, "logits", "curated"))["image_id"].to_pylist())
        == curated
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["curate.images_per_query=0"], "curate.images_per_query must be >= 1, got 0"),
        (["curate.dedup_threshold=1.5"], "curate.dedup_threshold must be <= 1, got 1.5"),
        (["curate.scales=[1.5]"], "curate.scales must be numbers in (0, 1], got [1.5]"),
        (
            ["curate.gallery=/no/such/gallery"],
            "curate.gallery: gallery files not found: /no/such/gallery",
        ),
        (
            ["curate.encoder=vit_nonexistent_xl"],
            "curate.encoder: unknown model 'vit_nonexistent_xl'",
        ),
        (
            ["curate.index=IVF16,PQ7"],
            "curate.index: faiss cannot build 'IVF16,PQ7' for 64-d embeddings",
        ),
    ],
)
def test_curate_bad_input_is_one_line(overrides, message, tiny_task, tmp_path, capsys):
    code = cli.main(
        ["curate", "tiny", f"data.root={tiny_task}", f"out={tmp_path}/o", *BASE, *overrides]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("ktray: error: ") and message in last
    assert not os.path.exists(os.path.join(tmp_path, "o", "curate", "embeddings"))


def test_curate_on_s3(s3_server, ray_s3, tiny_task, tmp_path):
    """Gallery tar shards and every output (embeddings, index, transfer set) on S3."""
    fs = s3_server.fs
    images = _images(40, seed=13)
    for i in range(2):
        local = _tar_gallery(str(tmp_path / "g" / f"shard-{i:03d}.tar"), images[i::2])
        fs.put(local, f"{s3_server.bucket}/gallery/shard-{i:03d}.tar")
    out = s3_server.url("curate-out")
    cfg = _cfg(
        tiny_task,
        out,
        f"curate.gallery={s3_server.url('gallery')}",
        "curate.images_per_query=1",
        "curate.shard_rows=16",
    )
    m = curate_stage.run(cfg)
    assert m["images"]["gallery"] == 42 and m["skipped_by_set"]["gallery"] == 2
    fs.invalidate_cache()
    for name in (
        "transfer_set.parquet",
        "index.faiss",
        "report.png",
        "manifest.json",
        "embeddings/gallery/part-00002.parquet",
    ):
        assert fs.exists(f"{s3_server.bucket}/curate-out/curate/{name}"), name
    transfer = read_transfer(cfg, "curated")
    _check_balanced(transfer, 24, 1)
    assert all(s.startswith("s3://") for s in transfer["source"].to_pylist())


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
        "curate",
        "tiny",
        f"data.root={tiny_task}",
        f"out={out}",
        *BASE,
        f"curate.gallery={root}",
        "curate.images_per_query=4",  # 96 of the 100 web images
        "curate.index=IVF4,PQ16x4",
        "curate.target_recall=0.5",
        "curate.encoder=efficientnet_lite0",
        "curate.img_size=64",
        f"curate.dedup_threshold={LITE0_DUP}",
    ]
    assert cli.main(args) == 0
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["index_type"] == "IVF4,PQ16x4" and m["index"]["factory"] == "IVF4,PQ16x4"
    assert m["search_actors"] == 1  # one per node
    assert m["index"]["score_error"] > 0.01  # a lossy index: its scores are not the cosine
    transfer = pq.read_table(os.path.join(out, "curate", "transfer_set.parquet"))
    _check_balanced(transfer, 24, 4)
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
