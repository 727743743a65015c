"""Gallery search: exact IndexFlatIP against the IVF-PQ index ``choose_index`` picks.

Synthetic clustered unit vectors (generated chunk by chunk, never all in memory at once),
queries drawn from the same clusters. Each index is built and searched in its own
subprocess, so the peak RSS reported (``ru_maxrss``) is that index's alone; the RSS of
the bare worker (python + numpy + faiss imported) is shown beside it. Recall@10 is
|IVF-PQ top-10 ∩ exact top-10| / 10, averaged over queries; the IVF-PQ index is also
searched at a few other nprobe values to show the speed/recall trade-off. Usage:

    python benchmarks/retrieval_bench.py [--n 1000000] [--queries 10000] [--dim 256]
    python benchmarks/retrieval_bench.py --factory IVF4096,PQ64   # the no-re-ranking row
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

SIGMA = 0.06  # per-coordinate noise around a cluster centre; cos(x, centre) ~ 0.7 at 256-d


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _chunks(args, stream: int, total: int):
    """Unit vectors ``[<=chunk, dim]`` of a stream (0: gallery, 1: queries), reproducibly."""
    from ktray.retrieval import l2_normalize

    centres = l2_normalize(
        np.random.default_rng([args.seed, 9]).standard_normal(
            (args.clusters, args.dim), dtype=np.float32
        )
    )
    for i, start in enumerate(range(0, total, args.chunk)):
        rng = np.random.default_rng([args.seed, stream, i])
        n = min(args.chunk, total - start)
        x = centres[rng.integers(0, args.clusters, n)]
        x += SIGMA * rng.standard_normal((n, args.dim), dtype=np.float32)
        yield l2_normalize(x)


def worker(args) -> None:
    import faiss

    from ktray.retrieval import (
        FLAT_MAX_VECTORS,
        build_index,
        choose_index,
        save_index,
        search,
        set_nprobe,
    )
    from ktray.retrieval.index import parse_nlist, training_size

    bare_rss = _rss_gib()
    factory = (
        "Flat"
        if args.worker == "exact"
        else args.factory
        or choose_index(
            args.n,
            args.dim,
            int(args.budget_gb * 2**30),
            flat_max_vectors=0 if args.force_ivf else FLAT_MAX_VECTORS,
        )
    )
    timer = {"add": 0.0, "add_cpu": 0.0}

    def timed_shards(stream, total):
        # build_index trains, then pulls shards: the first pull ends training. Only the
        # index work is timed, not the synthetic data generation.
        timer["first_pull"], timer["first_pull_cpu"] = time.perf_counter(), time.process_time()
        for x in _chunks(args, stream, total):
            t, c = time.perf_counter(), time.process_time()
            yield x
            timer["add"] += time.perf_counter() - t
            timer["add_cpu"] += time.process_time() - c

    sample = None
    if factory != "Flat":
        # The training sample: the first vectors of the gallery stream (chunks are i.i.d.).
        n_train = training_size(factory, args.n)
        sample = np.concatenate(list(_chunks(args, 0, n_train)))
    t0, c0 = time.perf_counter(), time.process_time()
    index = build_index(factory, args.dim, sample, timed_shards(0, args.n))
    train_s, train_cpu = timer["first_pull"] - t0, timer["first_pull_cpu"] - c0
    del sample
    queries = np.concatenate(list(_chunks(args, 1, args.queries)))

    rows = []
    nlist = parse_nlist(factory)
    nprobe0 = faiss.extract_index_ivf(index).nprobe if nlist else 0
    for nprobe in [nprobe0 // 4, nprobe0 // 2, nprobe0, nprobe0 * 2] if nlist else [0]:
        if nlist:
            set_nprobe(index, nprobe)
        t, c = time.perf_counter(), time.process_time()
        _, ids = search(index, queries, args.k)
        sec, cpu = time.perf_counter() - t, time.process_time() - c
        np.save(os.path.join(args.out, f"{args.worker}-{nprobe}.npy"), ids)
        rows.append(
            {"nprobe": nprobe, "search_s": sec, "search_cpu": cpu, "default": nprobe == nprobe0}
        )
    path = os.path.join(args.out, f"{args.worker}.faiss")
    if nlist:
        set_nprobe(index, nprobe0)
    save_index(index, path)
    index_mib = os.path.getsize(path) / 2**20
    os.remove(path)
    json.dump(
        {
            "factory": factory,
            "train_s": train_s,
            "train_cpu": train_cpu,
            "add_s": timer["add"],
            "add_cpu": timer["add_cpu"],
            "bare_rss_gib": bare_rss,
            "peak_rss_gib": _rss_gib(),
            "index_mib": index_mib,
            "rows": rows,
            "threads": faiss.omp_get_max_threads(),
        },
        open(os.path.join(args.out, f"{args.worker}.json"), "w"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=100_000, help="vectors generated/added at once")
    ap.add_argument("--budget-gb", type=float, default=2.0, help="memory budget for choose_index")
    ap.add_argument(
        "--force-ivf",
        action="store_true",
        help="IVF-PQ even below choose_index's Flat size (for quick runs)",
    )
    ap.add_argument(
        "--factory",
        default="",
        help="a faiss factory string instead of "
        "choose_index's (e.g. IVF4096,PQ64: the same index without re-ranking)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["exact", "ivf"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="ktray-retrieval-bench-") as out:
        stats = {}
        for mode in ("exact", "ivf"):
            cmd = [sys.executable, __file__, "--worker", mode, "--out", out] + sys.argv[1:]
            print(f"[{mode}] running ... (load average {os.getloadavg()[0]:.1f})", flush=True)
            subprocess.run(cmd, check=True)
            stats[mode] = json.load(open(os.path.join(out, f"{mode}.json")))
        results = {
            (mode, row["nprobe"]): np.load(os.path.join(out, f"{mode}-{row['nprobe']}.npy"))
            for mode in ("exact", "ivf")
            for row in stats[mode]["rows"]
        }
        exact = results[("exact", 0)]
        true_score = _true_scores(args, results)

        print(
            f"\n{args.n:,} x {args.dim}-d clustered unit vectors ({args.clusters} clusters), "
            f"{args.queries:,} queries, k={args.k}, faiss threads "
            f"{stats['exact']['threads']}, load average now {os.getloadavg()[0]:.1f}\n"
        )
        print(
            "| index | nprobe | train s wall (CPU) | add s wall (CPU) | search s wall (CPU) "
            "| queries/s wall (per CPU-s) | recall@10 | score gap "
            "| peak RSS GiB (bare worker) | index MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        best = true_score[("exact", 0)].mean()
        for mode in ("exact", "ivf"):
            s = stats[mode]
            for row in s["rows"]:
                key = (mode, row["nprobe"])
                recall = (
                    np.mean([len(np.intersect1d(a, b)) for a, b in zip(results[key], exact)])
                    / args.k
                )
                name = (
                    "IndexFlatIP (exact)"
                    if mode == "exact"
                    else f"{'--factory' if args.factory else 'choose_index'}: {s['factory']}"
                )
                nprobe = (
                    f"{row['nprobe']}" + (" (default)" if row["default"] else "")
                    if mode == "ivf"
                    else "-"
                )
                first = row is s["rows"][0]
                cells = [
                    name,
                    nprobe,
                    f"{s['train_s']:.1f} ({s['train_cpu']:.1f})" if first else "",
                    f"{s['add_s']:.1f} ({s['add_cpu']:.1f})" if first else "",
                    f"{row['search_s']:.1f} ({row['search_cpu']:.1f})",
                    f"{args.queries / row['search_s']:,.0f} "
                    f"({args.queries / row['search_cpu']:,.0f})",
                    f"{recall:.3f}",
                    f"{best - true_score[key].mean():.4f}",
                    f"{s['peak_rss_gib']:.2f} ({s['bare_rss_gib']:.2f})" if first else "",
                    f"{s['index_mib']:.0f}" if first else "",
                ]
                print("| " + " | ".join(cells) + " |")
        print(
            "\nCPU = process CPU seconds over all threads: on a shared, loaded machine the "
            "wall times stretch, the CPU seconds much less."
        )
        print(
            f"score gap: mean exact cosine of the true top-{args.k} ({best:.4f}) minus that "
            "of the returned top-k (0 = as good as exact; small = the misses are near-ties)."
        )


def _true_scores(args, results: dict) -> dict:
    """Exact cosine of every returned (query, id), regenerating the gallery chunk by chunk."""
    uniq = np.unique(np.concatenate([ids.ravel() for ids in results.values()]))
    uniq = uniq[uniq >= 0]
    vecs = np.zeros((len(uniq), args.dim), dtype=np.float32)
    for i, chunk in enumerate(_chunks(args, 0, args.n)):
        start = i * args.chunk
        lo, hi = np.searchsorted(uniq, [start, start + len(chunk)])
        vecs[lo:hi] = chunk[uniq[lo:hi] - start]
    queries = np.concatenate(list(_chunks(args, 1, args.queries)))
    out = {}
    for key, ids in results.items():
        v = vecs[np.searchsorted(uniq, np.maximum(ids, 0))]  # [Q, k, D]
        score = np.einsum("qkd,qd->qk", v, queries)
        out[key] = np.where(ids >= 0, score, 0.0).mean(axis=1)
    return out


if __name__ == "__main__":
    main()
