"""`ktray curate`: query-balanced crop retrieval into a transfer set, on a tiny generated task.

The encoder is the tiny config's random-weight ``test_vit`` (seeded, so every actor and run
embeds alike). Its embeddings of the generated images are all close: gallery crops reach a
cosine of ~0.995 with test images, the planted near duplicate (a resized copy of a test image)
~0.999, so the near-duplicate threshold is 0.997.
"""

import json
import os

import pyarrow.parquet as pq
import pytest
from curate_helpers import (
    BASE,
    PLANTED,
    check_balanced,
    curate_cfg,
    curate_cli,
    gen_images,
    make_gallery,
    parquet_gallery,
    tar_gallery,
)

from ktray import cli, storage
from ktray.pipeline.tasks import read_transfer
from ktray.stages import curate as curate_stage


def test_curate_skips_corrupt_excludes_duplicates_deterministic_and_resumes(
    tiny_task, tmp_path, ray_local
):
    gallery = make_gallery(str(tmp_path / "gallery"), tiny_task)
    out = str(tmp_path / "out")
    cfg = curate_cfg(
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
    check_balanced(transfer, 24, 2)
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
    cfg2 = curate_cfg(
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
        curate_cfg(
            tiny_task,
            out,
            f"curate.gallery={gallery}",
            "curate.images_per_query=1",
            "curate.shard_rows=16",
        )
    )
    assert m4["computed_shards"] == 0 and m4["rows"] == 24


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_curate_gallery_parquet_and_webdataset(kind, tiny_task, tmp_path, ray_local):
    images = gen_images(40, seed=11)
    if kind == "parquet":
        uri = parquet_gallery(str(tmp_path / "g" / "shard-000.parquet"), images)
    else:
        uri = tar_gallery(str(tmp_path / "g" / "shard-000.tar"), images)
    out = str(tmp_path / "out")
    assert curate_cli(tiny_task, out, f"curate.gallery={uri}", "curate.images_per_query=1") == 0
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["images"]["gallery"] == 41 and m["skipped_by_set"]["gallery"] == 1
    transfer = pq.read_table(os.path.join(out, "curate", "transfer_set.parquet"))
    check_balanced(transfer, 24, 1)
    prefix = "p" if kind == "parquet" else "w"
    assert all(i.startswith(prefix) for i in transfer["image_id"].to_pylist())
    assert all("#" in s for s in transfer["source"].to_pylist())
    if kind == "parquet":
        # other images under the same path and keys: the gallery (only) is embedded again
        # and its index rebuilt
        index = os.path.join(out, "curate", "index.faiss")
        stamp = os.stat(index).st_mtime_ns
        parquet_gallery(uri, gen_images(40, seed=12))
        assert curate_cli(tiny_task, out, f"curate.gallery={uri}", "curate.images_per_query=1") == 0
        m2 = json.load(open(os.path.join(out, "curate", "manifest.json")))
        assert m2["config_hash"] != m["config_hash"]
        assert m2["computed_shards"] == m2["shards"]["gallery"] > 0
        assert os.stat(index).st_mtime_ns != stamp


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
    code = curate_cli(tiny_task, f"{tmp_path}/o", *overrides)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("ktray: error: ") and message in last
    assert not os.path.exists(os.path.join(tmp_path, "o", "curate", "embeddings"))


def test_curate_on_s3(s3_server, ray_s3, tiny_task, tmp_path):
    """Gallery tar shards and every output (embeddings, index, transfer set) on S3."""
    fs = s3_server.fs
    images = gen_images(40, seed=13)
    for i in range(2):
        local = tar_gallery(str(tmp_path / "g" / f"shard-{i:03d}.tar"), images[i::2])
        fs.put(local, f"{s3_server.bucket}/gallery/shard-{i:03d}.tar")
    out = s3_server.url("curate-out")
    cfg = curate_cfg(
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
    check_balanced(transfer, 24, 1)
    assert all(s.startswith("s3://") for s in transfer["source"].to_pylist())
