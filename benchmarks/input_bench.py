"""Distillation input throughput: img/s the Ray Data path delivers to the training loop.

Rows: (1) bare decode + view crop of one core (``DecodeViews`` in this process, no Ray) and
that x the machine's cores: the ceiling; (2) the distill stage's path (``view_dataset`` ->
``TorchTrainer(datasets=...)`` in Train V2 local mode -> ``iter_torch_batches`` with the local
shuffle buffer and prefetching -> uint8 batches) feeding a no-op model, measured from the
first batch to the end of one epoch. Goal: delivered >= 0.8 x cores x bare. The uint8 ->
normalised float step is the model's first op and runs on its device (the GPU in training);
``--normalize`` adds it on this CPU too, where it competes with the decode tasks for the same
cores. Measure steady state: the decode tasks start before the trainer's first batch, and the
views they decode meanwhile are delivered at once, so a short window overstates the rate
(20k rows of 64-px views read 1.09 x the ceiling, which no steady state can; 100k rows read
0.66). Hence the default 100k rows (36k for 192-px views is ~30 s a run). Usage:

    python benchmarks/input_bench.py [--rows 100000] [--batch 128] [--side 96] [--size 64]
                                     [--normalize] [config overrides, e.g. train.shuffle_buffer=0]
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

BARE_ROWS = 4096
"""Rows per sample of the bare rate (its median of >= 5 samples is the ceiling's core)."""


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
        x = batch["x"]
        if config["normalize"]:
            x = normalize(x, (0.5,) * 3, (0.25,) * 3, session.device)
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
    ap.add_argument("--rows", type=int, default=100_000, help="transfer-set rows (one epoch)")
    ap.add_argument("--images", type=int, default=3000, help="JPEGs the rows point at")
    ap.add_argument(
        "--part-rows",
        type=int,
        default=2048,
        help="rows per Parquet part (2,048: what the logits stage writes)",
    )
    ap.add_argument(
        "--measure", type=int, default=0, help="images to deliver per run (0: the whole epoch)"
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--side", type=int, default=96, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=64, help="student input side")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3, help="runs of each path; the median is kept")
    ap.add_argument(
        "--normalize",
        action="store_true",
        help="also convert each batch to normalised float32 on this CPU (the device's job)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.shuffle_buffer=0")
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
        images = make_images(work, args.images, side=args.side)
        uri = make_logits(work, images, args.rows, part_rows=args.part_rows)
        info = describe_targets(uri, "logits")
        # bare: one core decoding and cropping the same rows, no Ray (warm file cache)
        decode = DecodeViews({"x": args.size}, ["logits"])
        table = pq.read_table(uri, columns=info["columns"]).slice(0, BARE_ROWS)
        decode(table.slice(0, 256))

        def bare_rate() -> float:
            """One core decoding + cropping BARE_ROWS rows (~1-10 s), file cache warm."""
            sources.clear_cache()
            t = time.perf_counter()
            for i in range(0, len(table), 256):
                decode(table.slice(i, 256))
            return len(table) / (time.perf_counter() - t)

        cfg = load_config(
            None,
            [
                f"out={work}/out",
                f"ray.num_cpus={args.cpus}",
                f"student.img_size={args.size}",
                f"distill.batch_size={args.batch}",
                *args.overrides,
            ],
        )
        spec = DistillSpec.from_config(cfg, "task")
        # the ceiling: one core, measured before Ray starts (Ray's own processes and a
        # finished run's lingering workers take CPU from it afterwards)
        rates = [bare_rate() for _ in range(max(5, args.repeat))]
        bare = sorted(rates)[len(rates) // 2]
        ensure_ray(cfg.ray)
        runs = []
        for r in range(args.repeat):  # each run: a fresh dataset and trainer
            ds = view_dataset(uri, info["columns"], {"x": args.size}, spec)
            start = time.perf_counter()
            m = fit(
                cfg,
                f"input-bench-{r}",
                noop_worker,
                {
                    "spec": dataclasses.asdict(spec),
                    "images": args.measure or args.rows,
                    "normalize": args.normalize,
                },
                datasets={"train": ds},
            )
            wall = time.perf_counter() - start
            delivered = m["images"] / m["seconds"]
            runs.append((delivered / (bare * args.cpus), delivered, m, wall))
        runs.sort(key=lambda run: run[0])
        ratio, delivered, m, wall = runs[len(runs) // 2]  # the median run
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
        what = "float on this CPU" if args.normalize else "uint8"
        print(
            f"{f'Ray Data -> Train local mode -> no-op ({what})':52s} {delivered:8.1f} "
            f"{delivered / ceiling:10.2f}"
        )
        print(
            f"(the run of median rate of {args.repeat}; each run's ratio: "
            f"{', '.join(f'{run[0]:.2f}' for run in runs)}; bare 1-core runs: "
            f"{', '.join(f'{b:.0f}' for b in rates)} img/s; median run: "
            f"first batch after {m['first_s']:.1f} s, {m['images']} images measured, "
            f"wall {wall:.1f} s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
