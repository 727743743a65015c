"""Student training throughput: Ray Train against a plain PyTorch loop, same run, same data.

Every row trains the same student with the same distillation step (precomputed teacher logits
over Fashion-MNIST views) for the same number of steps; img/s counts training images per
second of the training loop (start-up shown apart). Rows: plain loop in this process (ktray's
loop, views decoded in-process by ``ViewStream``, no Ray), Ray Train V2 local mode
(num_workers=0) streaming the views or with them cached (``train.cache_decoded_mb``), Ray Train
with 1 worker, and with 2 DDP workers (gloo); the Ray rows read
their views through the distill stage's Ray Data path (``view_dataset``). Usage:

    python benchmarks/train_bench.py [--steps 40] [--batch 128] [--arch resnet10t] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch


def make_targets(work: str, fmnist: str, n: int) -> str:
    from ktray import storage
    from ktray.data.readers import read_idx
    from ktray.predict import expand_views, output_schema

    rows = expand_views(read_idx(fmnist, "train").slice(0, n), 1, 0)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(rows), 10)).astype(np.float32)
    feats = rng.normal(size=(len(rows), 8)).astype(np.float32)
    rows = rows.append_column(
        "logits", pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 10)
    )
    rows = rows.append_column(
        "features", pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), 8)
    )
    uri = os.path.join(work, "targets", "part-00000.parquet")
    storage.write_parquet(uri, rows.cast(output_schema(10, 8)))
    return os.path.dirname(uri)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--skip-ddp", action="store_true")
    args = ap.parse_args()

    import dataclasses

    from ktray.config import load_config
    from ktray.data.datasets import DecodeViews, ViewStream
    from ktray.stages.common import ensure_ray, fit
    from ktray.stages.train_data import describe_targets, view_dataset
    from ktray.stages.train_stage import train_worker
    from ktray.train.loop import LocalSession
    from ktray.train.specs import DistillSpec
    from ktray.train.worker import run_training

    work = tempfile.mkdtemp(prefix="ktray-bench-")
    try:
        uri = make_targets(work, args.fmnist, args.images)
        info = describe_targets(uri, "logits")
        base = load_config(
            None,
            [
                f"student.arch={args.arch}",
                f"student.img_size={args.size}",
                f"distill.steps={args.steps}",
                f"distill.batch_size={args.batch}",
                "distill.lr=1e-3",
                "distill.weight_decay=0",
                "distill.warmup_steps=1",
                "train.report_every=1000000",
                "train.checkpoint_every=1000000",
                "train.precision=fp32",
            ],
        )
        spec = DistillSpec.from_config(base, "task")
        config = {
            "spec": dataclasses.asdict(spec),
            "inputs": {"num_classes": 10, "rows": info["rows"]},
        }
        rows = []

        start = time.perf_counter()
        stream = ViewStream(
            info["files"],
            DecodeViews({"x": args.size}, ["logits"]),
            info["columns"],
            spec.decode_batch,
        )
        m = run_training(
            dict(config, inputs=dict(config["inputs"], out_dir=os.path.join(work, "plain"))),
            LocalSession("cpu", {"train": stream}),
        )
        rows.append(("plain loop (no Ray)", m, time.perf_counter() - start))

        variants = [
            ("Ray Train local mode, streamed", 0, False),
            ("Ray Train local mode, cached views", 0, True),
            ("Ray Train, 1 worker, streamed", 1, False),
            ("Ray Train, 1 worker, cached views", 1, True),
        ]
        if not args.skip_ddp:
            variants.append(("Ray Train, 2 DDP workers (gloo), cached", 2, True))
        # One Ray for every row, started as a worker-group run starts it: with the dashboard,
        # whose State API Ray Train's placement-group cleaner polls (without it the cleaner
        # logs "State API may be temporarily unavailable" every second of a worker row).
        most = max(workers for _, workers, _ in variants)
        ensure_ray(load_config(None, [f"ray.num_workers={most}", "ray.num_cpus=2"]).ray)
        for name, workers, cached in variants:
            cfg = load_config(
                None, [f"out={work}/{workers}", f"ray.num_workers={workers}", "ray.num_cpus=2"]
            )
            ds = view_dataset(
                uri,
                info["columns"],
                {"x": args.size},
                spec,
                seed=spec.seed,
                rows=info["rows"] if cached else 0,
                target_dim=10,
                described=info,
                steps=spec.steps,
            )
            start = time.perf_counter()
            m = fit(
                cfg,
                f"bench-{workers}-{int(cached)}",
                train_worker,
                dict(
                    config,
                    inputs=dict(
                        config["inputs"],
                        out_dir=os.path.join(work, f"model{workers}{cached}"),
                        passes=ds.passes,  # as the distill stage passes them
                    ),
                ),
                datasets={"train": ds},
            )
            rows.append((name, m, time.perf_counter() - start))

        plain = rows[0][1]["images"] / rows[0][1]["seconds"]
        print(
            f"\nstudent {args.arch} @ {args.size}px, batch {args.batch} (global), {args.steps} "
            f"steps, KD on precomputed logits, torch threads {torch.get_num_threads()}"
        )
        print(
            f"{'path':40s} {'images':>7s} {'loop s':>7s} {'img/s':>7s} {'vs plain':>8s} "
            f"{'wall s':>7s}"
        )
        for name, m, wall in rows:
            ips = m["images"] / m["seconds"]
            print(
                f"{name:40s} {m['images']:7d} {m['seconds']:7.1f} {ips:7.1f} "
                f"{ips / plain:8.2f} {wall:7.1f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
