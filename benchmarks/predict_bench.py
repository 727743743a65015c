"""Batch prediction throughput: ``ktray predict`` (Ray Data) against a plain loop, same run.

Rows: the plain loop in this process (decode + resize + forward, batch by batch, torch using
every core), and the ``predict`` stage over the same folder of JPEGs (CPU decode tasks feeding
a model actor, ``infer.*``), twice: the first run pays Ray's start-up. Usage:

    python benchmarks/predict_bench.py [--images 2000] [--side 128] [--size 96]
                                       [--arch efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=128, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=96, help="model input side")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from ktray.config import load_config
    from ktray.data.sources import load_images
    from ktray.data.views import eval_transform
    from ktray.models import TaskModel, create_backbone, save_model
    from ktray.stages import predict

    work = tempfile.mkdtemp(prefix="ktray-predict-bench-")
    try:
        rng = np.random.default_rng(0)
        folder = os.path.join(work, "images")
        os.makedirs(folder)
        paths = []
        for i in range(args.images):
            a = rng.integers(0, 255, (args.side // 8, args.side // 8, 3), dtype=np.uint8)
            img = Image.fromarray(a).resize((args.side, args.side), Image.Resampling.BILINEAR)
            paths.append(os.path.join(folder, f"{i:06d}.jpg"))
            img.save(paths[-1], quality=90)
        backbone = create_backbone(args.arch, pretrained=False)
        model = TaskModel(backbone, 10).eval()
        model_dir = os.path.join(work, "model")
        spec = {
            "kind": "teacher",
            "backbone": args.arch,
            "arch": args.arch,
            "num_classes": 10,
            "img_size": args.size,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        }
        save_model(model, model_dir, spec)
        rows = []

        start = time.perf_counter()  # the plain loop: what one process does with every core
        n = 0
        with torch.inference_mode():
            for i in range(0, len(paths), args.batch):
                images = [im for im in load_images(paths[i : i + args.batch]) if im is not None]
                x = [eval_transform(im, args.size, spec["mean"], spec["std"]) for im in images]
                model(torch.stack(x)).argmax(1)
                n += len(x)
        rows.append(("plain loop (decode + forward, one process)", n, time.perf_counter() - start))

        for run in ("first run, incl. Ray start-up", "second run"):
            cfg = load_config(None, [f"out={work}/out-{len(rows)}", "tracking.mlflow=false"])
            start = time.perf_counter()
            m = predict.run(cfg, model_dir, folder, batch_size=args.batch)
            rows.append((f"ktray predict, {run}", m["rows"], time.perf_counter() - start))

        print(
            f"\n{args.arch} @ {args.size} px, {args.images} JPEGs of {args.side} px, batch "
            f"{args.batch}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        )
        print(f"{'path':48s} {'images':>7s} {'seconds':>8s} {'img/s':>8s} {'vs plain':>8s}")
        plain = rows[0][1] / rows[0][2]
        for name, n, sec in rows:
            print(f"{name:48s} {n:7d} {sec:8.2f} {n / sec:8.1f} {n / sec / plain:8.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
