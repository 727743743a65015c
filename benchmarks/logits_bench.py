"""Teacher-logit throughput: the Ray Data ``logits`` stage against plain PyTorch, same run.

Rows: the bare model forward on pre-made tensors (upper bound), the plain loop over the same
rows with ktray's Predictor (decode + view + forward in one process, no Ray), and the Ray Data
stage (a CPU decode stage feeding an actor pool that writes Parquet shards; ``infer.*``).
Usage:

    python benchmarks/logits_bench.py [--images 2000] [--size 96] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()

    from ktray.config import load_config
    from ktray.data.readers import read_idx
    from ktray.models import TaskModel, create_backbone, save_model
    from ktray.predict import Predictor, expand_views
    from ktray.stages import logits as logits_stage
    from ktray.stages.common import ensure_ray
    from ktray.stages.timeline import timeline

    work = tempfile.mkdtemp(prefix="ktray-bench-")
    try:
        backbone = create_backbone(args.backbone)
        model = TaskModel(backbone, 10)
        model_dir = os.path.join(work, "teacher")
        save_model(
            model,
            model_dir,
            {
                "kind": "teacher",
                "arch": args.backbone,
                "backbone": args.backbone,
                "num_classes": 10,
                "img_size": args.size,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
            },
        )
        table = read_idx(args.fmnist, "train").slice(0, args.images)
        rows = expand_views(table, 1, 0)
        results = []

        # 1. bare forward on ready tensors (channels_last, as the Predictor runs it)
        m = model.eval().to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
            memory_format=torch.channels_last
        )
        with torch.inference_mode():
            m.forward_all(x)
            n, start = 0, time.perf_counter()
            while n < args.images:
                m.forward_all(x)
                n += args.batch
        results.append(("bare forward (tensors ready)", n, time.perf_counter() - start))

        # 2. plain loop: decode + view + forward with the library Predictor, no Ray
        pred = Predictor(model_dir, batch_size=args.batch, features=False)
        start = time.perf_counter()
        out, _ = pred.predict(rows)
        results.append(("plain loop (Predictor)", out.num_rows, time.perf_counter() - start))

        # 3. Ray Data stage: decode tasks (1 CPU) + 1 model actor (1 CPU), Parquet shards
        cfg = load_config(
            None,
            [
                f"out={work}/run",
                f"logits.batch_size={args.batch}",
                "infer.actors=1",
                "infer.cpus_per_actor=1",
                "infer.decode_cpus=1",
                "ray.num_cpus=2",
            ],
        )
        ensure_ray(cfg.ray)
        shard_rows = args.shard_rows
        n_shards = -(-len(rows) // shard_rows)
        timelines = []
        for run in range(2):  # the second pass: actor and decode workers already warm
            out_dir = os.path.join(work, f"logits{run}")
            os.makedirs(out_dir)
            start, began = time.perf_counter(), time.time()
            stats = logits_stage._compute(
                cfg, model_dir, out_dir, rows, list(range(n_shards)), shard_rows, False
            )
            label = "incl. start-up" if run == 0 else "second pass"
            timelines.append(f"{label}: {timeline(stats, began, time.time())}")
            results.append(
                (
                    f"Ray Data stage (decode + 1 actor, {label})",
                    sum(s["rows"] for s in stats),
                    time.perf_counter() - start,
                )
            )
        inner = sum(s["seconds"] for s in stats)
        results.append(("Ray Data stage (inside the actor)", sum(s["rows"] for s in stats), inner))

        base = results[1][1] / results[1][2]
        print(
            f"\nteacher {args.backbone} @ {args.size}px, {args.images} Fashion-MNIST images, "
            f"batch {args.batch}, torch threads {torch.get_num_threads()}, "
            f"device {'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        print(f"{'path':52s} {'images':>7s} {'seconds':>8s} {'img/s':>8s} {'vs plain':>8s}")
        for name, n, secs in results:
            print(f"{name:52s} {n:7d} {secs:8.2f} {n / secs:8.1f} {n / secs / base:8.2f}")
        for line in timelines:  # where each pass's wall time went
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
