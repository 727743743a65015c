"""Gallery index at scale: the curate stage's build path over float16 embedding parts.

Synthetic clustered unit vectors are written as float16 embedding part files (the stored
contract; generated chunk by chunk, never all in memory). A worker subprocess then runs the
stage's own path: :class:`PartStore` (footers only), the index :func:`choose_index` picks
within ``--budget-gb`` with the build's training sample and part buffers reserved (or
``--index``), :func:`build_measured` (training sample from a random subset of parts, every
part read once to add it and to search it exactly for ``--tune-queries``, nprobe and, for
an index with a ``Refine`` stage, its re-ranking depth ``k_factor`` tuned to the cheapest pair
reaching ``--target-recall``). In the same pass a second, held-out set of
``--eval-queries`` is searched exactly: recall@10 is measured on queries the tuning never saw.
Then ``--queries`` queries are searched at the chosen nprobe and k_factor (wall and CPU
seconds, all faiss threads; on a shared machine queries per CPU-second is the honest rate).
Peak RSS (``ru_maxrss``) is the worker's own; the bare worker's (python + numpy + faiss +
pyarrow imported) is shown beside it. Usage:

    python benchmarks/retrieval_bench.py [--n 10000000] [--dim 256] [--queries 100000]
    python benchmarks/retrieval_bench.py --n 1000000 --index IVF4096,PQ64   # no re-ranking
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SIGMA = 0.06  # per-coordinate noise around a cluster centre; cos(x, centre) ~ 0.7 at 256-d
TUNE, EVAL, SEARCH, GALLERY = 1, 2, 3, 0  # random streams


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


_POOL: dict = {}


def _vectors(args, stream: int, i: int, n: int) -> np.ndarray:
    """``n`` unit vectors of chunk ``i`` of a stream, reproducibly.

    Gallery chunks take their Gaussian noise from one pool of rows, permuted and with a
    random sign per coordinate for every chunk (distinct vectors, the same distribution):
    drawing 2.5 billion normals for 10M x 256 would dominate the benchmark's run time.
    """
    from ktray.retrieval import l2_normalize

    centres = l2_normalize(
        np.random.default_rng([args.seed, 9]).standard_normal(
            (args.clusters, args.dim), dtype=np.float32
        )
    )
    rng = np.random.default_rng([args.seed, stream, i])
    x = centres[rng.integers(0, args.clusters, n)]
    if stream == GALLERY:
        if "noise" not in _POOL:
            pool_rng = np.random.default_rng([args.seed, 8])
            _POOL["noise"] = SIGMA * pool_rng.standard_normal(
                (args.part_rows, args.dim), dtype=np.float32
            )
        pool = _POOL["noise"]
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), args.dim)
        x += pool[rng.permutation(len(pool))[:n]] * signs
    else:
        x += SIGMA * rng.standard_normal((n, args.dim), dtype=np.float32)
    return l2_normalize(x)


def write_parts(args, out: str) -> list[str]:
    """The gallery as float16 embedding parts (``gallery_index`` + ``embedding``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for i, start in enumerate(range(0, args.n, args.part_rows)):
        n = min(args.part_rows, args.n - start)
        v = _vectors(args, GALLERY, i, n).astype(np.float16)
        col = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), args.dim)
        gi = pa.array(np.arange(start, start + n, dtype=np.int64))
        path = os.path.join(out, f"part-{i:05d}.parquet")
        pq.write_table(pa.table({"gallery_index": gi, "embedding": col}), path + ".tmp")
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def _say(msg: str) -> None:
    print(f"[worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def worker(args) -> None:
    import logging

    import faiss

    logging.basicConfig(
        level=logging.INFO, format="[worker %(asctime)s] %(message)s", datefmt="%H:%M:%S"
    )

    from ktray.retrieval import build_reserve_bytes, choose_index, save_index, search
    from ktray.retrieval.store import PartStore
    from ktray.retrieval.tune import ExactTopK, build_measured, recall_at_k

    bare = _rss_gib()
    parts = sorted(
        os.path.join(args.parts, f) for f in os.listdir(args.parts) if f.endswith(".parquet")
    )
    held_out = ExactTopK(_vectors(args, EVAL, 0, args.eval_queries), 10)

    class Observed(PartStore):
        """The stage's store, whose single pass also feeds the held-out exact search."""

        def __iter__(self):
            for vec in super().__iter__():
                held_out.add(vec)
                yield vec

    store = Observed(parts)
    factory = (
        args.index
        if args.index != "auto"
        else choose_index(
            len(store),
            args.dim,
            int(args.budget_gb * 2**30),
            reserve_bytes=build_reserve_bytes(len(store), args.dim, int(store.counts.max())),
        )
    )
    tune = _vectors(args, TUNE, 0, args.tune_queries)
    _say(f"building {factory} over {len(store):,} vectors in {len(parts)} parts")
    t0, c0 = time.perf_counter(), time.process_time()
    index, rep = build_measured(factory, store, tune, args.seed, args.target_recall)
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_build = _rss_gib()
    _, ids = search(index, held_out.queries, 10)
    eval_recall = recall_at_k(ids, held_out.ids)
    path = os.path.join(args.out, "index.faiss")
    save_index(index, path)
    index_mib = os.path.getsize(path) / 2**20
    if args.keep_index:
        os.replace(path, args.keep_index)  # for re-tuning or searching without a rebuild
    else:
        os.remove(path)

    _say(
        f"built {factory} in {build_s:.0f}s (nprobe {rep.nprobe}, k_factor {rep.k_factor}, "
        f"recall {rep.recall}); tried [nprobe, k_factor, recall, cost]: {rep.tried_grid}; "
        f"held-out recall {eval_recall:.3f}; searching {args.queries:,} queries"
    )
    chunk = 10_000
    search_s = search_cpu = 0.0
    searched = 0
    for i, start in enumerate(range(0, args.queries, chunk)):
        q = _vectors(args, SEARCH, i, min(chunk, args.queries - start))
        t, c = time.perf_counter(), time.process_time()
        search(index, q, 10)
        search_s += time.perf_counter() - t
        search_cpu += time.process_time() - c
        searched += len(q)
        if args.search_budget_s and search_s > args.search_budget_s:
            break  # timed on the queries searched so far (reported)
    json.dump(
        {
            "factory": factory,
            "report": rep.as_dict(),
            "build_s": build_s,
            "build_cpu": build_cpu,
            "eval_recall": eval_recall,
            "index_mib": index_mib,
            "bare_rss": bare,
            "rss_build": rss_build,
            "peak_rss": _rss_gib(),
            "search_s": search_s,
            "search_cpu": search_cpu,
            "searched": searched,
            "threads": faiss.omp_get_max_threads(),
        },
        open(os.path.join(args.out, "result.json"), "w"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="gallery vectors")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=100_000, help="queries searched (timed)")
    ap.add_argument("--eval-queries", type=int, default=1000, help="held-out recall queries")
    ap.add_argument("--tune-queries", type=int, default=1000, help="nprobe tuning queries")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--part-rows", type=int, default=500_000)
    ap.add_argument("--budget-gb", type=float, default=8.0, help="curate.memory_budget_gb")
    ap.add_argument("--index", default="auto", help="auto or a faiss factory string")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument(
        "--search-budget-s",
        type=float,
        default=0,
        help="stop the timed search after this many seconds (0: all --queries)",
    )
    ap.add_argument("--parts", default="", help="reuse (or keep) the parts in this folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-index", default="", help="keep the built index at this path")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    out = tempfile.mkdtemp(prefix="ktray-retrieval-bench-")
    parts_dir = args.parts or os.path.join(out, "parts")
    try:
        meta = os.path.join(parts_dir, "bench.json")
        want = {k: getattr(args, k) for k in ("n", "dim", "clusters", "part_rows", "seed")}
        t = time.perf_counter()
        if not (os.path.exists(meta) and json.load(open(meta)) == want):
            shutil.rmtree(parts_dir, ignore_errors=True)
            os.makedirs(parts_dir)
            write_parts(args, parts_dir)
            json.dump(want, open(meta, "w"))
        disk = sum(
            os.path.getsize(os.path.join(parts_dir, f))
            for f in os.listdir(parts_dir)
            if f.endswith(".parquet")
        )
        print(
            f"[data] {disk / 2**30:.2f} GiB of float16 parts in {time.perf_counter() - t:.0f}s "
            f"(load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        cmd = [sys.executable, __file__, "--worker", "--out", out, "--parts", parts_dir]
        rest, argv = [], sys.argv[1:]
        for i, a in enumerate(argv):  # every argument but --parts (given above)
            if a.startswith("--parts") or (i and argv[i - 1] == "--parts"):
                continue
            rest.append(a)
        subprocess.run(cmd + rest, check=True)
        r = json.load(open(os.path.join(out, "result.json")))
    finally:
        if not args.parts:
            shutil.rmtree(out, ignore_errors=True)
    rep = r["report"]
    print(
        f"\n{args.n:,} x {args.dim}-d clustered unit vectors ({args.clusters} clusters) in "
        f"float16 parts of {args.part_rows:,}; budget {args.budget_gb} GB; faiss threads "
        f"{r['threads']}; load average now {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| index | nprobe | k_factor | train s | add s (+exact probes) | tune s | build s (CPU s) "
        "| recall@10 tuning / held-out | index MiB | peak RSS GiB (bare worker) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['factory']} | {rep['nprobe']} | {rep.get('k_factor')} | "
        f"{rep['train_seconds']:.0f} | "
        f"{rep['add_seconds']:.0f} | {rep['tune_seconds']:.0f} | {r['build_s']:.0f} "
        f"({r['build_cpu']:.0f}) | {rep['recall']:.3f} / {r['eval_recall']:.3f} "
        f"({rep['probe_queries']} / {args.eval_queries} queries) | {r['index_mib']:,.0f} | "
        f"{r['peak_rss']:.2f} ({r['bare_rss']:.2f}) |"
    )
    print(
        f"\n[nprobe, k_factor, recall@10, relative cost] tried: {rep.get('tried_grid')}; "
        f"training sample "
        f"{rep['train_vectors']:,} vectors from {rep['parts_read_for_sample']} parts"
    )
    nq = r["searched"]
    per_cpu = nq / r["search_cpu"]
    print(
        f"\nsearch: {nq:,} queries, k=10, nprobe {rep['nprobe']}, k_factor "
        f"{rep.get('k_factor')}: "
        f"{r['search_s']:.1f} s wall ({nq / r['search_s']:,.0f} q/s), "
        f"{r['search_cpu']:.1f} CPU s ({per_cpu:,.0f} queries per CPU-second)"
    )
    print(
        f"extrapolation: 100,000 queries on 16 cores at this per-CPU rate = "
        f"{100_000 / per_cpu / 16:.0f} s (search parallelises over queries; no other "
        f"scaling assumed)"
    )


if __name__ == "__main__":
    main()
