"""Peak memory of the balanced selection against the gallery size, with the candidates fixed.

The vector -> image map is an int32 file opened as ``np.memmap`` (``--crops`` vectors per
image, in image order like the curate stage's parts) and ``--exclude`` images are excluded;
``--queries`` query images of two crops each take ``--quota`` images through a fake search
that returns seeded random gallery vectors (so the candidates do not depend on the gallery
beyond their ids). Python-heap peak above the inputs is measured with ``tracemalloc`` (numpy
reports its buffers to it; the memmap's pages are file cache, not heap). Usage:

    python benchmarks/select_memory_bench.py --n 5000000 50000000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc

import numpy as np

from ktray.retrieval import balanced_select


def measure(n: int, args, folder: str) -> dict:
    path = os.path.join(folder, f"iov-{n}.i32")
    with open(path, "wb") as f:  # written in chunks: the map is never in memory
        for start in range(0, n, 1 << 22):
            (np.arange(start, min(n, start + (1 << 22)), dtype=np.int64) // args.crops).astype(
                np.int32
            ).tofile(f)
    iov = np.memmap(path, dtype=np.int32, mode="r")
    n_images = (n - 1) // args.crops + 1
    rng = np.random.default_rng(0)
    exclude = rng.choice(n_images, args.exclude, replace=False)
    queries = rng.standard_normal((2 * args.queries, 8)).astype(np.float32)
    query_ids = [f"q{i // 2}" for i in range(2 * args.queries)]

    def search_fn(v, k):
        r = np.random.default_rng([int(abs(v[0, 0]) * 1e6), k])
        ids = r.integers(0, n, (len(v), k))
        return -np.sort(-r.random((len(v), k)).astype(np.float32), axis=1), ids

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t, c = time.perf_counter(), time.process_time()
    table, shortfall = balanced_select(
        search_fn, queries, query_ids, iov, args.quota, k0=64, seed=0, exclude_images=exclude
    )
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del iov
    os.remove(path)
    return {
        "n": n,
        "peak_mib": peak / 2**20,
        "wall": wall,
        "cpu": cpu,
        "selected": len(table["image_id"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[5_000_000, 50_000_000])
    ap.add_argument("--crops", type=int, default=4, help="gallery vectors per image")
    ap.add_argument("--queries", type=int, default=1000, help="query images (2 crops each)")
    ap.add_argument("--quota", type=int, default=20, help="images per query")
    ap.add_argument("--exclude", type=int, default=10_000, help="excluded gallery images")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(
        "| gallery vectors | int64 map would be MiB | selection peak extra MiB | wall s "
        "| CPU s | selected |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ktray-select-bench-") as d:
        for n in args.n:
            r = measure(n, args, d)
            print(
                f"| {n:,} | {n * 8 / 2**20:,.0f} | {r['peak_mib']:.1f} | {r['wall']:.1f} | "
                f"{r['cpu']:.1f} | {r['selected']:,} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
