"""Crop-embedding throughput: the curate stage's Ray Data pipeline against a plain loop.

Same run, same model, same images: Fashion-MNIST rows expanded to crops (full image + grid
crops) and embedded by the retrieval encoder. Rows of the table:

1. the bare encoder forward on ready tensors (upper bound);
2. the plain loop: ``Embedder.embed_rows`` in this process (decode + crop + forward, no Ray);
3. the Ray Data pipeline of ``ktray curate`` (shards as blocks, decode tasks on CPU, an actor
   pool writing Parquet part files) for each actor layout asked for, timed from submission
   (actor start-up included) and inside the actors (the sum of the shards' own seconds).

Usage:

    python benchmarks/embed_bench.py [--images 2000] [--size 48] [--grid 1]
        [--encoder efficientnet_lite0] [--layouts 1x1,2x0.5]   # actors x cpus per actor
        [--decode-cpus 1]
        [--threads N]   # torch threads of the plain loop (default: torch's own)

Each actor runs ``int(cpus per actor)`` torch threads, as the stage does; Ray starts its
workers with ``OMP_NUM_THREADS`` set. On an oversubscribed machine (load far above the core
count) a process with torch's default OpenMP threads runs several times slower, so compare
like with like: ``OMP_NUM_THREADS=1 python benchmarks/embed_bench.py --threads 1``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import pyarrow as pa
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--grid", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument(
        "--decode-cpus", type=float, default=1.0, help="CPUs per decode task (infer.decode_cpus)"
    )
    ap.add_argument(
        "--layouts",
        default="1x1,2x0.5",
        help="Ray Data actor layouts, ACTORSxCPUS_PER_ACTOR, comma separated",
    )
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of this process (bare forward, plain loop); 0 = default",
    )
    args = ap.parse_args()
    if args.threads > 0:  # before any torch work: changing it later is slow
        torch.set_num_threads(args.threads)

    from ktray.config import load_config
    from ktray.data.readers import read_idx
    from ktray.retrieval.embed import CropScheme, Embedder, EncoderSpec
    from ktray.stages import curate_embed
    from ktray.stages.common import ensure_ray

    work = tempfile.mkdtemp(prefix="ktray-embed-bench-")
    try:
        spec = EncoderSpec(args.encoder, True, "", args.size)
        scheme = CropScheme(0, args.grid, (0.6,), 0)
        table = read_idx(args.fmnist, "train").slice(0, args.images)
        rows = pa.table(
            {
                "gallery_index": pa.array(range(len(table)), pa.int64()),
                "image_id": table["image_id"],
                "source": table["source"],
            }
        )
        crops = len(rows) * scheme.crops_per_image()
        results = []

        # 1. bare forward on ready tensors (channels_last, as the Embedder runs it)
        embedder = Embedder(spec, batch_size=args.batch)
        x = torch.randn(args.batch, 3, args.size, args.size)
        embedder.embed_tensors(x)
        n, start = 0, time.perf_counter()
        while n < crops:
            embedder.embed_tensors(x)
            n += args.batch
        results.append(("bare forward (tensors ready)", n, time.perf_counter() - start))

        # 2. plain loop: decode + crop + forward with the library Embedder, no Ray
        start = time.perf_counter()
        out, _ = embedder.embed_rows(rows, scheme)
        results.append(
            ("plain loop (Embedder.embed_rows)", out.num_rows, time.perf_counter() - start)
        )

        # 3. the curate stage's Ray Data pipeline, per actor layout
        blocks = [
            curate_embed.embed_block(rows, "gallery", s, args.shard_rows)
            for s in range(-(-len(rows) // args.shard_rows))
        ]
        for layout in args.layouts.split(","):
            actors, cpus = (float(v) for v in layout.lower().split("x"))
            cfg = load_config(
                None,
                [
                    f"out={work}/run",
                    f"curate.batch_size={args.batch}",
                    f"infer.actors={int(actors)}",
                    f"infer.cpus_per_actor={cpus}",
                    f"infer.decode_cpus={args.decode_cpus}",
                    "ray.num_cpus=2",
                ],
            )
            ensure_ray(cfg.ray)
            out_dir = os.path.join(work, f"emb-{layout}")
            os.makedirs(out_dir)
            start = time.perf_counter()
            stats = curate_embed.embed_shards(
                cfg,
                spec,
                {"gallery": scheme.as_dict()},
                {"gallery": out_dir},
                blocks,
                scheme.crops_per_image(),
            )
            done = sum(s["rows"] for s in stats)
            results.append(
                (
                    f"Ray Data, {int(actors)} actor x {cpus:g} CPU (incl. start-up)",
                    done,
                    time.perf_counter() - start,
                )
            )
            results.append(
                (
                    f"Ray Data, {int(actors)} actor x {cpus:g} CPU (inside actors)",
                    done,
                    sum(s["seconds"] for s in stats) / actors,
                )
            )

        base = results[1][1] / results[1][2]
        load = os.getloadavg()[0]
        print(
            f"\nencoder {args.encoder} @ {args.size}px, {args.images} Fashion-MNIST images x "
            f"{scheme.crops_per_image()} crops, batch {args.batch}, torch threads "
            f"{torch.get_num_threads()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
            f", load average {load:.1f} on {os.cpu_count()} cores"
        )
        print(f"{'path':52s} {'crops':>7s} {'seconds':>8s} {'crops/s':>8s} {'vs plain':>8s}")
        for name, n, secs in results:
            print(f"{name:52s} {n:7d} {secs:8.2f} {n / secs:8.1f} {n / secs / base:8.2f}")
        print(
            "(inside actors: the shards' own seconds / actors, i.e. wall time if the actors "
            "had run side by side from the start)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
