"""Curation at gallery scale: index build, recall, search and balanced selection from parts.

The gallery is synthetic clustered unit vectors written as float16 embedding part files (the
stored contract), so the measured path is the curate stage's own after embedding:
:class:`PartStore` (footers only), :func:`build_measured` (training sample from a random
subset of parts, every part read once to add it and to search it exactly for up to 1,000
probe queries, nprobe raised until recall@10 reaches the target), exact leak protection
(:func:`scan_near_duplicates`, planted near copies of protected vectors; the approximate
index-only check beside it) and :func:`balanced_select`. It runs in a subprocess, so peak
RSS (``ru_maxrss``) is that of the measured path only; the bare worker's RSS (python + numpy
+ faiss + pyarrow) is shown beside it. Search is timed at 1 and 2 faiss threads in the same
process. Usage:

    python benchmarks/curate_scale_bench.py [--n 2000000] [--dim 64] [--queries 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SIGMA = 0.12  # per-coordinate noise around a cluster centre


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _centres(args) -> np.ndarray:
    from ktray.retrieval import l2_normalize

    rng = np.random.default_rng([args.seed, 9])
    return l2_normalize(rng.standard_normal((args.clusters, args.dim), dtype=np.float32))


def _vectors(args, stream: int, i: int, n: int) -> np.ndarray:
    from ktray.retrieval import l2_normalize

    rng = np.random.default_rng([args.seed, stream, i])
    x = _centres(args)[rng.integers(0, args.clusters, n)]
    x += SIGMA * rng.standard_normal((n, args.dim), dtype=np.float32)
    return l2_normalize(x)


def write_parts(args, out: str) -> tuple[list[str], np.ndarray]:
    """Gallery parts (float16 fixed-size lists + gallery_index); planted near copies of the
    protected vectors at known rows. Returns the part paths and the planted rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ktray.retrieval import l2_normalize

    protected = _vectors(args, 2, 0, args.protected)
    rng = np.random.default_rng([args.seed, 3])
    planted = np.sort(rng.choice(args.n, args.protected, replace=False))
    noise = l2_normalize(rng.standard_normal(protected.shape, dtype=np.float32))
    copies = l2_normalize(protected + 0.12 * noise)  # cosine ~0.99 with the protected vector
    paths = []
    for i, start in enumerate(range(0, args.n, args.part_rows)):
        n = min(args.part_rows, args.n - start)
        v = _vectors(args, 0, i, n)
        here = (planted >= start) & (planted < start + n)
        v[planted[here] - start] = copies[here]
        col = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float16).ravel()), args.dim)
        gi = pa.array((np.arange(start, start + n) // args.crops).astype(np.int64))
        path = os.path.join(out, f"part-{i:05d}.parquet")
        pq.write_table(pa.table({"gallery_index": gi, "embedding": col}), path)
        paths.append(path)
    return paths, planted


def worker(args) -> None:
    import faiss

    from ktray.retrieval import (
        balanced_select,
        choose_index,
        remove_near_duplicates,
        save_index,
        search,
    )
    from ktray.retrieval.near_duplicates import scan_near_duplicates
    from ktray.retrieval.store import PartStore
    from ktray.retrieval.tune import build_measured

    bare = _rss_gib()
    parts = sorted(os.path.join(args.out, f) for f in os.listdir(args.out) if f.startswith("part-"))
    planted = np.load(os.path.join(args.out, "planted.npy"))
    store = PartStore(parts)
    queries = np.concatenate(
        [_vectors(args, 1, i, args.crops) for i in range(args.queries)]
    )  # crops of one query: one draw
    factory = (
        args.index
        if args.index != "auto"
        else choose_index(len(store), args.dim, int(args.budget_gb * 2**30))
    )
    t0, c0 = time.perf_counter(), time.process_time()
    index, rep = build_measured(factory, store, queries, args.seed, args.target_recall)
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_build = _rss_gib()
    path = os.path.join(args.out, "index.faiss")
    save_index(index, path)
    index_mib = os.path.getsize(path) / 2**20
    os.remove(path)

    rows = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        t, c = time.perf_counter(), time.process_time()
        search(index, queries, 10)
        rows.append(
            {
                "threads": threads,
                "search_s": time.perf_counter() - t,
                "search_cpu": time.process_time() - c,
            }
        )

    t = time.perf_counter()
    protected = _vectors(args, 2, 0, args.protected)
    approx = remove_near_duplicates(index, protected, np.arange(len(store)), 0.97)
    leak_s_approx = time.perf_counter() - t
    t = time.perf_counter()
    pairs, _ = scan_near_duplicates(
        ((int(store.offsets[p]), v) for p, v in enumerate(store)), protected, 0.97
    )
    excluded = set(np.unique(pairs[:, 1]).tolist())
    leak_s = time.perf_counter() - t

    image_of_vector = np.arange(len(store)) // args.crops
    excluded_images = np.unique(image_of_vector[sorted(excluded)])
    t = time.perf_counter()
    sel_report: dict = {}
    table, short = balanced_select(
        lambda v, k: search(index, v, k),
        queries,
        np.repeat(np.arange(args.queries), args.crops),
        image_of_vector,
        args.images_per_query,
        k0=max(64, 2 * args.images_per_query * args.crops),
        seed=args.seed,
        exclude_images=excluded_images,
        report=sel_report,
    )
    select_s = time.perf_counter() - t
    leaked = np.isin(table["image_id"], image_of_vector[planted]).sum()
    json.dump(
        {
            "factory": factory,
            "report": rep.as_dict(),
            "build_s": build_s,
            "build_cpu": build_cpu,
            "index_mib": index_mib,
            "bare_rss": bare,
            "rss_build": rss_build,
            "peak_rss": _rss_gib(),
            "rows": rows,
            "select_s": select_s,
            "selected": int(len(table["image_id"])),
            "shortfall": int(sum(short.values())),
            "capped": len(sel_report["capped"]),
            "max_depth": sel_report["max_depth"],
            "searches": sel_report["searches"],
            "leak_s": leak_s,
            "leak_s_approx": leak_s_approx,
            "planted": len(planted),
            "caught": int(np.isin(planted, sorted(excluded)).sum()),
            "caught_approx": int(np.isin(planted, sorted(approx)).sum()),
            "leaked": int(leaked),
        },
        open(os.path.join(args.out, "result.json"), "w"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000_000, help="gallery crop vectors")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--crops", type=int, default=5, help="crops per image (query and gallery)")
    ap.add_argument("--queries", type=int, default=2000, help="query images")
    ap.add_argument("--images-per-query", type=int, default=20)
    ap.add_argument(
        "--protected",
        type=int,
        default=500,
        help="protected (test) vectors, each with a near copy planted in the gallery",
    )
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--part-rows", type=int, default=250_000)
    ap.add_argument("--budget-gb", type=float, default=4.0)
    ap.add_argument("--index", default="auto", help="auto or a faiss factory string")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="ktray-curate-scale-") as out:
        t = time.perf_counter()
        parts, planted = write_parts(args, out)
        np.save(os.path.join(out, "planted.npy"), planted)
        write_s = time.perf_counter() - t
        disk = sum(os.path.getsize(p) for p in parts) / 2**20
        print(
            f"[data] {len(parts)} parts, {disk:,.0f} MiB float16, {write_s:.0f}s "
            f"(load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        subprocess.run(
            [sys.executable, __file__, "--worker", "--out", out] + sys.argv[1:], check=True
        )
        r = json.load(open(os.path.join(out, "result.json")))
    rep = r["report"]
    nq = args.queries * args.crops
    print(
        f"\n{args.n:,} x {args.dim}-d gallery crops ({args.n // args.crops:,} images x "
        f"{args.crops} crops, {args.clusters} clusters) in {len(parts)} float16 parts; "
        f"{args.queries:,} queries x {args.crops} crops; budget {args.budget_gb} GB; "
        f"load average now {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| index | nprobe | train s | add s (+exact probes) | tune s | build s (CPU s) "
        "| recall@10 "
        f"({rep['probe_queries']} probes) | index MiB | peak RSS GiB (bare worker) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['factory']} | {rep['nprobe']} | {rep['train_seconds']:.1f} | "
        f"{rep['add_seconds']:.1f} | {rep['tune_seconds']:.1f} | {r['build_s']:.1f} "
        f"({r['build_cpu']:.1f}) | "
        f"{rep['recall']:.3f} (target {rep['target_recall']}) | {r['index_mib']:.0f} | "
        f"{r['peak_rss']:.2f} ({r['bare_rss']:.2f}) |"
    )
    print(
        f"\nnprobe -> recall@10 tried: {rep['tried']}; training sample "
        f"{rep['train_vectors']:,} vectors from {rep['parts_read_for_sample']} of "
        f"{len(parts)} parts; score error (p99) {rep['score_error']:.4f}"
    )
    print(
        f"\n| faiss threads | search s ({nq:,} query crops, k=10) | CPU s | queries/s "
        "| queries per CPU-s | vs 1 thread |"
    )
    print("|---|---|---|---|---|---|")
    base = r["rows"][0]["search_s"]
    for row in r["rows"]:
        print(
            f"| {row['threads']} | {row['search_s']:.2f} | {row['search_cpu']:.2f} | "
            f"{nq / row['search_s']:,.0f} | {nq / row['search_cpu']:,.0f} | "
            f"{base / row['search_s']:.2f} |"
        )
    print("\n| step | seconds | result |")
    print("|---|---|---|")
    print(
        f"| leak check, approximate only | {r['leak_s_approx']:.2f} | "
        f"{r['caught_approx']}/{r['planted']} planted copies caught |"
    )
    print(
        "| leak check as the stage runs it: exact scan of every gallery vector | "
        f"{r['leak_s']:.2f} | {r['caught']}/{r['planted']} caught |"
    )
    print(
        f"| balanced selection ({args.images_per_query}/query) | {r['select_s']:.1f} | "
        f"{r['selected']:,} images, shortfall {r['shortfall']}, capped {r['capped']}, "
        f"deepest k {r['max_depth']}, {r['searches']:,} crop searches, "
        f"{r['leaked']} planted copies selected |"
    )


if __name__ == "__main__":
    main()
