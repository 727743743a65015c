"""Inference-pass input throughput: img/s the logits pass's decode stage delivers to its model
actors, against bare decode-per-core x cores measured in the same run.

The logits pass (and the embedding, evaluation and ``ktray predict`` passes, which share
``ktray.stages.shards.map_shards``) decodes each shard of views in a Ray Data CPU stage and
hands it whole to a model actor. Here the model actor does nothing (it writes a one-column
part), so the pass runs at the rate its decode stage delivers: what a GPU actor whose model is
faster than the decode cores would get. The actor asks for ``--actor-cpus`` (0.25: it needs
almost none) and the decode stage for the rest (``infer.decode_cpus`` = (cpus - 0.25) /
cpus, so that ``--cpus`` decode calls fit at once). The ceiling: ``--cpus`` plain processes
(no Ray) decoding the same rows with the same function (``decode_tasks.logits_views``) side
by side, sampled before and after each run (``input_bench.Ceiling``).

Two rates per run: **steady** (rows delivered from the end of the first shard to the end of
the last, over that time: what a long pass gets) and **whole pass** (all rows over the pass's
wall time, Ray Data start-up and the first decode wave included). Usage:

    python benchmarks/infer_input_bench.py [--rows 200000] [--shard-rows 2048] [--side 96]
                                           [--size 64] [config overrides, e.g. infer.x=y]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import input_bench  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from scale_bench import make_images  # noqa: E402

from ktray.stages.shards import ShardWriter  # noqa: E402
from ktray.stages.timeline import steady_rate, timeline  # noqa: E402


class NoopWriter(ShardWriter):
    """A model actor with no model: a shard's image ids go to its part file."""

    def __init__(self, out_dirs: dict, threads: int = 0):
        super().__init__(out_dirs, threads)
        self.ready()

    def process(self, part: dict) -> tuple[pa.Table, int]:
        return pa.table({"image_id": part["image_id"].astype(str)}), 0


_bare: dict = {}


def _bare_init(uri: str, size: int, shard_rows: int) -> None:
    from ktray.stages import decode_tasks, shards

    rows = pq.read_table(uri)
    _bare["block"] = shards.shard_block(rows, "", 0, min(shard_rows, input_bench.BARE_ROWS))
    _bare["decode"] = lambda block: decode_tasks.logits_views(block, size)
    _bare["decode"](_bare["block"].slice(0, 64))  # warm: open shards, first decode


def _bare_pass(_: int) -> int:
    from ktray.data import sources

    sources.clear_cache()  # as a decode task starts: shards opened afresh
    _bare["decode"](_bare["block"])
    return len(_bare["block"])


def run_pass(cfg, rows: pa.Table, shard_rows: int, size: int, out: str) -> dict:
    """One logits-shaped pass over ``rows`` with the no-op writer: its rates."""
    from ktray.stages import decode_tasks, shards

    n = shards.n_shards(len(rows), shard_rows)
    blocks = [shards.shard_block(rows, "", s, shard_rows) for s in range(n)]
    os.makedirs(out, exist_ok=True)
    start = time.time()
    stats = shards.map_shards(
        cfg,
        blocks,
        decode_tasks.logits_views,
        {"size": size},
        NoopWriter,
        {"out_dirs": {"": out}},
        shard_rows * size * size * 3,
        lambda row: f"shard {row['shard']}",
    )
    wall = time.time() - start
    print(f"  where the time went: {timeline(stats, start, start + wall)}", flush=True)
    first = min(s["start"] + s["seconds"] for s in stats) - start
    return {
        "steady": steady_rate(stats) or 0.0,
        "whole": len(rows) / wall,
        "wall": wall,
        "first": first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="views in the pass")
    ap.add_argument("--images", type=int, default=3000, help="JPEGs the views are cut from")
    ap.add_argument(
        "--views",
        type=int,
        default=1,
        help="views per image (1: every row decodes its own image, the decode-heaviest case)",
    )
    ap.add_argument("--shard-rows", type=int, default=2048, help="the logits stage's 2,048")
    ap.add_argument("--side", type=int, default=96, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=64, help="the teacher's input side")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--actor-cpus", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=3, help="passes; the median is kept")
    ap.add_argument(
        "--decode",
        choices=("auto", "actors", "tasks"),
        default="auto",
        help="the decode stage: ktray's choice by shards a slot (auto), or always actors/tasks",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. infer.decode_cpus=1")
    args = ap.parse_args()

    from ktray.config import load_config
    from ktray.predict import expand_views
    from ktray.stages import decode_tasks
    from ktray.stages.common import ensure_ray

    if args.decode != "auto":
        decode_tasks.TASK_SHARDS_PER_SLOT = 0 if args.decode == "actors" else 10**9

    work = tempfile.mkdtemp(prefix="ktray-infer-input-")
    ceiling = None
    try:
        sources = make_images(work, args.images, side=args.side)
        n = -(-args.rows // args.views)  # images in the pass, the JPEGs repeated in order
        images = pa.table(
            {
                "image_id": [f"i{i}" for i in range(n)],
                "source": [sources[i % len(sources)] for i in range(n)],
            }
        )
        rows = expand_views(images, args.views, 0).slice(0, args.rows)
        # image-major (an image's views adjacent, decoded once), sources in file order: as
        # the pass reads a set
        rows_uri = os.path.join(work, "rows.parquet")
        pq.write_table(rows, rows_uri)
        decode_cpus = (args.cpus - args.actor_cpus) / args.cpus
        cfg = load_config(
            None,
            [
                f"out={work}/out",
                f"ray.num_cpus={args.cpus}",
                f"infer.cpus_per_actor={args.actor_cpus}",
                f"infer.decode_cpus={decode_cpus:.4f}",
                *args.overrides,
            ],
        )
        ceiling = input_bench.Ceiling(
            args.cpus, (rows_uri, args.size, args.shard_rows), _bare_init, _bare_pass
        )  # before Ray
        ensure_ray(cfg.ray)
        runs = []
        for r in range(args.repeat):
            input_bench.wait_idle()
            before = ceiling.sample()
            m = run_pass(cfg, rows, args.shard_rows, args.size, os.path.join(work, f"p{r}"))
            input_bench.wait_idle()
            after = ceiling.sample()
            bare = (before + after) / 2
            runs.append((m["steady"] / bare, m["whole"] / bare, bare, m))
        runs.sort(key=lambda run: run[0])
        steady, whole, bare, m = runs[len(runs) // 2]
        print(
            f"\n{args.rows} views ({args.views} an image) of {args.images} JPEGs ({args.side} "
            f"px) at {args.size} px, "
            f"shards of {args.shard_rows}, {args.cpus} CPUs, decode_cpus "
            f"{cfg.infer.decode_cpus:g}, actor cpus {args.actor_cpus:g}, decode {args.decode}"
        )
        print(f"{'path (the run of median steady ratio)':52s} {'img/s':>8s} {'vs ceiling':>10s}")
        print(f"{f'bare decode, {args.cpus} processes at once (no Ray)':52s} {bare:8.1f} {1:10.2f}")
        print(f"{'decode stage -> no-op actor, steady':52s} {m['steady']:8.1f} {steady:10.2f}")
        print(f"{'decode stage -> no-op actor, whole pass':52s} {m['whole']:8.1f} {whole:10.2f}")
        print(f"each run: steady ratio, whole-pass ratio (of {args.repeat}):")
        for run in runs:
            print(
                f"  {run[0]:.2f}, {run[1]:.2f} (ceiling {run[2]:.0f} img/s; wall "
                f"{run[3]['wall']:.1f} s, first shard done after {run[3]['first']:.1f} s)"
            )
    finally:
        if ceiling is not None:
            ceiling.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
