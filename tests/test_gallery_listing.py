"""img2dataset galleries listed without reading image bytes: webdataset shards through their
sidecar Parquet + ``_stats.json``, tar headers streamed otherwise; and such a gallery through
``ktray curate`` once (Ray)."""

import io as _io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from curate_helpers import curate_cli, gen_images, png

from ktray.data import tarlist
from ktray.data.readers import read_gallery


# ----------------------------------------------------------------------------- img2dataset
def _img2dataset_shard(
    root: str, shard: int, n: int, fail: set[int], payload: bytes, ext: str = "jpg"
) -> None:
    """One img2dataset webdataset shard: NNNNN.tar (+ .parquet metadata, _stats.json)."""
    stem = os.path.join(root, f"{shard:05d}")
    keys = [f"{shard:05d}{i:04d}" for i in range(n)]
    ok = [k for i, k in enumerate(keys) if i not in fail]
    with tarfile.open(stem + ".tar", "w") as tar:
        for k in ok:
            for name, blob in (
                (f"{k}.{ext}", payload),
                (f"{k}.txt", b"a caption"),
                (f"{k}.json", b'{"status": "success"}'),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, _io.BytesIO(blob))
    pq.write_table(
        pa.table(
            {
                "url": [f"http://x/{k}" for k in keys],
                "caption": ["c"] * n,
                "key": keys,
                "status": ["failed_to_download" if i in fail else "success" for i in range(n)],
                "width": [32] * n,
            }
        ),
        stem + ".parquet",
    )
    with open(stem + "_stats.json", "w") as f:
        json.dump({"count": n, "successes": len(ok), "failed_to_download": len(fail)}, f)


def test_img2dataset_webdataset_listed_from_sidecars(tmp_path, monkeypatch):
    root = str(tmp_path / "wds")
    os.makedirs(root)
    big = b"\xff\xd8" + bytes(200_000)  # 200 kB "images": listing must not read them
    _img2dataset_shard(root, 0, 6, {1, 4}, big)
    _img2dataset_shard(root, 1, 5, {0}, big)
    scans = []
    real = tarlist.scan_tar_members
    monkeypatch.setattr(
        tarlist,
        "scan_tar_members",
        lambda uri, stop_at_image=False: scans.append(stop_at_image) or real(uri, stop_at_image),
    )
    t = read_gallery(root)  # parquet files present, but metadata-only: the tars are the gallery
    assert t["image_id"].to_pylist() == [
        "000000000",
        "000000002",
        "000000003",
        "000000005",
        "000010001",
        "000010002",
        "000010003",
        "000010004",
    ]
    src = t["source"].to_pylist()
    assert src[0] == os.path.join(root, "00000.tar") + "#000000000.jpg"
    assert scans == [True]  # one header peek (the image extension), no full listing


def test_img2dataset_stats_mismatch_and_no_sidecar_stream_headers(tmp_path):
    root = str(tmp_path / "wds")
    os.makedirs(root)
    _img2dataset_shard(root, 0, 4, set(), b"x" * 300_000, ext="png")
    # a stats file that disagrees: the sidecar is not trusted, the tar headers are streamed
    json.dump({"successes": 3}, open(os.path.join(root, "00000_stats.json"), "w"))
    assert tarlist.sidecar_keys(os.path.join(root, "00000.tar")) is None
    os.remove(os.path.join(root, "00000.parquet"))
    t = read_gallery(os.path.join(root, "00000.tar"))
    assert len(t) == 4 and t["source"][0].as_py().endswith("#000000000.png")


def test_tar_header_scan_skips_member_data(tmp_path, monkeypatch):
    root = str(tmp_path / "t")
    os.makedirs(root)
    _img2dataset_shard(root, 0, 8, set(), bytes(1_000_000))
    read = {"bytes": 0}
    import fsspec.implementations.local as local

    real_read = local.LocalFileOpener.read

    def counting_read(self, *a, **k):
        out = real_read(self, *a, **k)
        read["bytes"] += len(out)
        return out

    monkeypatch.setattr(local.LocalFileOpener, "read", counting_read)
    names = tarlist.scan_tar_members(os.path.join(root, "00000.tar"))
    assert len(names) == 24
    assert read["bytes"] < 200_000 < os.path.getsize(os.path.join(root, "00000.tar")) // 40


def test_curate_on_img2dataset_webdataset_layout(tiny_task, tmp_path, ray_local):
    root = str(tmp_path / "wds")
    os.makedirs(root)
    for shard, imgs in enumerate((gen_images(12, seed=21), gen_images(10, seed=22))):
        stem = os.path.join(root, f"{shard:05d}")
        keys = [f"{shard:05d}{i:04d}" for i in range(len(imgs) + 1)]
        with tarfile.open(stem + ".tar", "w") as tar:
            for k, img in zip(keys, imgs):
                for name, blob in ((f"{k}.png", png(img)), (f"{k}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, _io.BytesIO(blob))
        pq.write_table(
            pa.table({"key": keys, "status": ["success"] * len(imgs) + ["failed"]}),
            stem + ".parquet",
        )
        json.dump({"count": len(keys), "successes": len(imgs)}, open(stem + "_stats.json", "w"))
    out = str(tmp_path / "out")
    overrides = [
        f"curate.gallery={root}",
        "curate.images_per_query=1",
        "curate.dedup_gallery=true",
        "curate.search_actors=2",
        "curate.search_cpus=1",
    ]
    assert curate_cli(tiny_task, out, *overrides) == 0
    m = json.load(open(os.path.join(out, "curate", "manifest.json")))
    assert m["search_actors"] == 2  # query batches split over two actors holding the index
    assert m["images"]["gallery"] == 22 and m["skipped_by_set"]["gallery"] == 0
    assert m["index"]["recall"] == 1.0 and m["index"]["factory"] == "Flat"
    assert "gallery_duplicates" in m and "by_reason" in m["shortfall"]
    transfer = pq.read_table(os.path.join(out, "curate", "transfer_set.parquet"))
    assert all(".tar#" in s for s in transfer["source"].to_pylist())
