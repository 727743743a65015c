"""Image sources on a real S3 server (skipped when none can start): image files of a batch are
read side by side, one GET each (one after another, a batch of files waited one round trip
each: 9 img/s at 50 ms round trips in ``benchmarks/s3_input_bench.py``, 80 side by side)."""

import io
import threading
import time

import numpy as np
from PIL import Image


def test_image_files_on_s3_are_read_side_by_side(s3_server, monkeypatch):
    from ktray.data import sources

    rng = np.random.default_rng(0)
    arrays, uris = [], []
    for i in range(12):
        a = rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        uri = s3_server.url("files", f"img{i}.png")
        s3_server.fs.pipe(uri, buf.getvalue())
        arrays.append(a)
        uris.append(uri)
    missing = s3_server.url("files", "missing.png")

    active, peak, lock = 0, 0, threading.Lock()
    read = sources._read_file

    def slow_read(uri):  # a GET that takes a round trip
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        try:
            return read(uri)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(sources, "_read_file", slow_read)
    images = sources.load_images([*uris, missing])
    assert peak >= 4  # one after another: 1
    assert images[-1] is None
    for img, a in zip(images, arrays):
        np.testing.assert_array_equal(np.asarray(img), a)
    img, reason = sources._load_with_reasons([missing])[0]
    assert img is None and "missing.png" in reason
