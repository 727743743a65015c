"""The tiny curate setup shared by the curate tests: overrides, generated galleries (folders
with broken files and a planted near copy, Parquet bytes, tar shards) and the balance check."""

import io as _io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from imagegen import draw
from PIL import Image

from ktray import cli
from ktray.config import load_config

BASE = [
    "curate.img_size=32",
    "curate.grid=1",
    "curate.scales=[0.6]",
    "curate.dedup_threshold=0.997",
    "curate.batch_size=32",
    "tracking.mlflow=false",
]
PLANTED = "dup/test_copy.png"


def gen_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [draw(i % 3, rng, 32) for i in range(n)]


def png(img: Image.Image) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_gallery(root: str, task: str, n: int = 64) -> str:
    """n generated images, 3 unreadable image files, a text file, and a resized copy of a
    test image (a near duplicate that must never be selected)."""
    for i, img in enumerate(gen_images(n, seed=7)):
        d = os.path.join(root, f"g{i % 4}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{i}.png"))
    bad = os.path.join(root, "bad")
    os.makedirs(bad)
    whole = png(gen_images(1, seed=8)[0])
    open(os.path.join(bad, "truncated.png"), "wb").write(whole[: len(whole) // 2])
    open(os.path.join(bad, "not_an_image.jpg"), "wb").write(b"hello, not a jpeg")
    open(os.path.join(bad, "empty.png"), "wb").write(b"")
    open(os.path.join(bad, "readme.txt"), "w").write("not listed: no image extension")
    os.makedirs(os.path.join(root, "dup"))
    test_img = Image.open(os.path.join(task, "test", "class1", "2.png")).convert("RGB")
    test_img.resize((48, 48)).save(os.path.join(root, PLANTED))
    return root


def curate_cfg(task, out, *extra):
    return load_config("tiny", [f"data.root={task}", f"out={out}", *BASE, *extra])


def check_balanced(transfer: pa.Table, queries: int, per_query: int) -> None:
    ids = transfer["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == queries * per_query  # none assigned twice
    counts = {}
    for q, r in zip(transfer["query_id"].to_pylist(), transfer["rank"].to_pylist()):
        counts.setdefault(q, []).append(r)
    assert len(counts) == queries
    assert all(sorted(r) == list(range(per_query)) for r in counts.values())
    assert set(transfer["label"].to_pylist()) == {-1}


def curate_cli(task: str, out: str, *extra: str) -> int:
    """``ktray curate tiny`` on ``task`` into ``out`` with :data:`BASE` + ``extra``."""
    return cli.main(["curate", "tiny", f"data.root={task}", f"out={out}", *BASE, *extra])


def parquet_gallery(path: str, imgs: list[Image.Image]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = [png(img) for img in imgs] + [b"\x89PNG\r\n truncated"]
    pq.write_table(pa.table({"key": [f"p{i:03d}" for i in range(len(rows))], "png": rows}), path)
    return path


def tar_gallery(path: str, imgs: list[Image.Image]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate([png(img) for img in imgs] + [b"not an image"]):
            for name, blob in ((f"w{i:03d}.png", data), (f"w{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, _io.BytesIO(blob))
    return path


def clustered(n: int, dim: int, seed: int, clusters: int = 50, sigma: float = 0.08) -> np.ndarray:
    """``[n, dim]`` unit vectors around ``clusters`` fixed random centres (noise ``sigma``)."""
    from ktray.retrieval import l2_normalize

    rng = np.random.default_rng(seed)
    centres = l2_normalize(np.random.default_rng(99).standard_normal((clusters, dim)))
    return l2_normalize(
        centres[rng.integers(0, clusters, n)]
        + sigma * rng.standard_normal((n, dim)).astype(np.float32)
    )
