"""Image sources on a real S3 server (skipped when none can start): image files of a batch are
read side by side, one GET each (one after another, a batch of files waited one round trip
each: 9 img/s at 50 ms round trips in ``benchmarks/s3_input_bench.py``; 80 on 16 threads and
s3fs's 10 connections; 473 all at once on s3fs's event loop, 64 connections)."""

import io
import threading
import time

import numpy as np
from PIL import Image


def random_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (5, 6, 3), dtype=np.uint8) for _ in range(n)]


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_image_files_on_s3_are_read_side_by_side(s3_server, monkeypatch):
    import asyncio

    import fsspec

    from ktray.data import sources

    arrays, uris = random_images(12, 0), []
    for i, a in enumerate(arrays):
        name = "img[0].png" if i == 0 else f"img{i}.png"  # not a glob pattern: a name
        uris.append(s3_server.url("files", name))
        s3_server.fs.pipe(uris[-1], png(a))
    missing = s3_server.url("files", "missing.png")

    fs = fsspec.core.url_to_fs(uris[0])[0]  # the (cached) filesystem the reader gets
    active, peak, cat = 0, 0, fs._cat_file

    async def slow_cat(path, *args, **kwargs):  # a GET that takes a round trip
        nonlocal active, peak
        active += 1  # (one event loop: no lock)
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        try:
            return await cat(path, *args, **kwargs)
        finally:
            active -= 1

    monkeypatch.setattr(fs, "_cat_file", slow_cat)
    images = sources.load_images([*uris, missing])
    assert peak == 13  # all of the batch at once; one after another: 1
    assert images[-1] is None
    for img, a in zip(images, arrays):
        np.testing.assert_array_equal(np.asarray(img), a)
    img, reason = sources._load_with_reasons([missing, uris[1]])[0]
    assert img is None and "missing.png" in reason and "FileNotFoundError" in reason


def test_image_files_of_a_filesystem_without_async_reads_come_from_threads(monkeypatch):
    import fsspec

    from ktray.data import source_cache, sources

    fs = fsspec.filesystem("memory")
    arrays = random_images(6, 1)
    uris = [f"memory://ktray-test-threads/{i}.png" for i in range(len(arrays))]
    for uri, a in zip(uris, arrays):
        fs.pipe(uri, png(a))
    threads = set()
    cat = fs.cat_file

    def counted(path, *args, **kwargs):
        threads.add(threading.get_ident())
        time.sleep(0.02)
        return cat(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", counted)
    images = sources.load_images([*uris, "memory://ktray-test-threads/missing.png"])
    assert images[-1] is None
    for img, a in zip(images, arrays):
        np.testing.assert_array_equal(np.asarray(img), a)
    assert threading.get_ident() not in threads and len(threads) > 1  # the fetch pool's
    assert source_cache.FETCH_THREADS >= len(threads)


def test_an_s3_client_holds_a_connection_for_each_read_at_once(s3_server):
    """botocore's default pool (10 connections) held a batch's GETs to 10 round trips at once
    whatever the reader asked for. The settings apply in a process that imports only the
    readers (they were in ``ktray.storage``, which the readers do not import)."""
    import subprocess
    import sys

    from ktray.data import source_cache

    code = (
        "import fsspec\n"
        "from ktray.data import sources  # what a decode process imports\n"
        f"fs = fsspec.core.url_to_fs({s3_server.url('files', 'x.png')!r})[0]\n"
        "fs.connect()\n"
        "print(fs.s3.meta.config.max_pool_connections, fs.s3.meta.config.connect_timeout)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    pool, connect = out.stdout.split()
    assert int(pool) >= source_cache.FETCH_AT_ONCE and int(connect) == 10
