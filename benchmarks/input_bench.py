"""Distillation input throughput: img/s the Ray Data path delivers to the training loop.

Rows: (1) bare decode + view crop of one core (``DecodeViews`` in this process, no Ray) and
that x the machine's cores: the ceiling; (2) the distill stage's path (``view_dataset`` ->
``TorchTrainer(datasets=...)`` in Train V2 local mode -> ``iter_torch_batches`` with the local
shuffle buffer and prefetching -> uint8 -> normalised float on the device) feeding a no-op
model, measured after the first batch. Goal: delivered >= 0.8 x cores x bare. Usage:

    python benchmarks/input_bench.py [--rows 20000] [--batch 128] [--side 96] [--size 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale_bench import make_images, make_logits  # noqa: E402


def noop_worker(config: dict) -> dict:
    """Consume the shard like the distill loop does, with a no-op model."""
    from ktray.data.datasets import normalize
    from ktray.stages.common import RaySession

    session = RaySession()
    spec = config["spec"]
    it = session.dataset("train").iter_torch_batches(
        batch_size=spec["batch_size"],
        drop_last=True,
        device="cpu",
        local_shuffle_buffer_size=spec["shuffle_buffer"] or None,
        prefetch_batches=spec["prefetch_batches"],
    )
    n, start, first = 0, None, 0.0
    t0 = time.perf_counter()
    for batch in it:
        x = normalize(batch["x"], (0.5,) * 3, (0.25,) * 3, session.device)
        batch["logits"].float()
        if start is None:  # start-up (first batch) apart
            start, first = time.perf_counter(), time.perf_counter() - t0
            continue
        n += len(x)
        if n >= config["images"]:
            break
    return {"images": n, "seconds": time.perf_counter() - start, "first_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--images", type=int, default=3000, help="JPEGs the rows point at")
    ap.add_argument("--measure", type=int, default=12800, help="images to deliver")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--side", type=int, default=96, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=64, help="student input side")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from ktray.config import load_config
    from ktray.data import sources
    from ktray.data.datasets import DecodeViews
    from ktray.stages.common import ensure_ray, fit
    from ktray.stages.train_data import describe_targets, view_dataset
    from ktray.train.specs import DistillSpec

    work = tempfile.mkdtemp(prefix="ktray-input-")
    try:
        uri = make_logits(work, make_images(work, args.images, side=args.side), args.rows)
        info = describe_targets(uri, "logits")
        # bare: one core decoding and cropping the same rows, no Ray (warm file cache)
        decode = DecodeViews({"x": args.size}, ["logits"])
        table = pq.read_table(uri, columns=info["columns"]).slice(0, 2048)
        decode(table.slice(0, 256))
        sources.clear_cache()
        t = time.perf_counter()
        for i in range(0, len(table), 256):
            decode(table.slice(i, 256))
        bare = len(table) / (time.perf_counter() - t)

        cfg = load_config(
            None,
            [
                f"out={work}/out",
                f"ray.num_cpus={args.cpus}",
                f"student.img_size={args.size}",
                f"distill.batch_size={args.batch}",
            ],
        )
        ensure_ray(cfg.ray)
        spec = DistillSpec.from_config(cfg, "task")
        ds = view_dataset(uri, info["columns"], {"x": args.size}, spec)
        start = time.perf_counter()
        m = fit(
            cfg,
            "input-bench",
            noop_worker,
            {"spec": dataclasses.asdict(spec), "images": args.measure},
            datasets={"train": ds},
        )
        wall = time.perf_counter() - start
        delivered = m["images"] / m["seconds"]
        ceiling = bare * args.cpus
        print(
            f"\n{args.rows} rows -> {args.images} JPEGs of {args.side} px, views at "
            f"{args.size} px, batch {args.batch}, {args.cpus} CPUs, "
            f"decode_cpus {spec.decode_cpus}, shuffle buffer {spec.shuffle_buffer}, "
            f"prefetch {spec.prefetch_batches}"
        )
        print(f"{'path':52s} {'img/s':>8s} {'vs ceiling':>10s}")
        print(f"{'bare decode + crop, 1 core (no Ray)':52s} {bare:8.1f} {bare / ceiling:10.2f}")
        print(f"{f'bare x {args.cpus} cores (ceiling)':52s} {ceiling:8.1f} {1.0:10.2f}")
        print(
            f"{'Ray Data -> Train local mode -> no-op model':52s} {delivered:8.1f} "
            f"{delivered / ceiling:10.2f}"
        )
        print(
            f"(first batch after {m['first_s']:.1f} s; {m['images']} images measured; "
            f"wall {wall:.1f} s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
