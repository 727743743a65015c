"""Teacher-logit throughput: the Ray Data ``logits`` stage against plain PyTorch, same run.

Rows: the bare model forward on pre-made tensors (upper bound), the plain loop over the same
rows with ktray's Predictor (decode + view + forward, no Ray), and the Ray Data stage (actor
pool writing Parquet shards). Usage:

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
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from ktray.config import load_config
    from ktray.data.readers import read_idx
    from ktray.models import TaskModel, create_backbone, save_model
    from ktray.predict import Predictor, expand_views
    from ktray.stages import logits as logits_stage
    from ktray.stages.common import ensure_ray

    work = tempfile.mkdtemp(prefix="ktray-bench-")
    try:
        backbone = create_backbone(args.backbone)
        model = TaskModel(backbone, 10)
        model_dir = os.path.join(work, "teacher")
        save_model(model, model_dir, {"kind": "teacher", "arch": args.backbone,
                                      "backbone": args.backbone, "num_classes": 10,
                                      "img_size": args.size, "mean": list(backbone.mean),
                                      "std": list(backbone.std)})
        table = read_idx(args.fmnist, "train").slice(0, args.images)
        rows = expand_views(table, 1, 0)
        results = []

        # 1. bare forward on ready tensors (channels_last, as the Predictor runs it)
        m = model.eval().to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            m.forward_all(x)
            n, start = 0, time.perf_counter()
            while n < args.images:
                m.forward_all(x)
                n += args.batch
        results.append(("bare forward (tensors ready)", n, time.perf_counter() - start))

        # 2. plain loop: decode + view + forward with the library Predictor, no Ray
        pred = Predictor(model_dir, batch_size=args.batch)
        start = time.perf_counter()
        out, _ = pred.predict(rows)
        results.append(("plain loop (Predictor)", out.num_rows, time.perf_counter() - start))

        # 3. Ray Data stage: actor pool, shards written as Parquet
        cfg = load_config(None, [f"out={work}/run", f"logits.batch_size={args.batch}",
                                 "logits.actors=1", "logits.cpus_per_actor=2"])
        ensure_ray(cfg.ray)
        rows_sharded, n_shards = logits_stage.add_shards(rows, 1024)
        out_dir = os.path.join(work, "logits")
        os.makedirs(out_dir)
        start = time.perf_counter()
        stats = logits_stage._compute(cfg, model_dir, out_dir, rows_sharded,
                                      list(range(n_shards)), 1024)
        results.append(("Ray Data stage (1 actor, incl. start-up)",
                        sum(s["rows"] for s in stats), time.perf_counter() - start))
        inner = sum(s["seconds"] for s in stats)
        results.append(("Ray Data stage (inside the actor)", sum(s["rows"] for s in stats), inner))

        base = results[1][1] / results[1][2]
        print(f"\nteacher {args.backbone} @ {args.size}px, {args.images} Fashion-MNIST images, "
              f"batch {args.batch}, torch threads {torch.get_num_threads()}, "
              f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
        print(f"{'path':44s} {'images':>7s} {'seconds':>8s} {'img/s':>8s} {'vs plain':>8s}")
        for name, n, secs in results:
            print(f"{name:44s} {n:7d} {secs:8.2f} {n / secs:8.1f} {n / secs / base:8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
