"""Evaluation: in the driver process against Ray Data batch inference, same run, same model.

Where the crossover lies decides ``infer.eval_rows`` (above it the ``evaluate`` stage uses Ray
Data). Rows: for each test-set size, the local loop (``evaluate_model_dir``: a DataLoader in
this process) and Ray Data (decode tasks + a model actor returning confusion counts), both
timed end to end (the Ray Data row includes its actor start-up, paid once per evaluation).
Usage:

    python benchmarks/eval_bench.py [--sizes 1000,4000,10000] [--arch resnet10t] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,10000")
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()

    from ktray import storage
    from ktray.config import load_config
    from ktray.data.readers import read_idx
    from ktray.evaluation import evaluate_model_dir
    from ktray.models import create_student, save_model
    from ktray.stages.common import ensure_ray
    from ktray.stages.evaluate import evaluate_distributed

    work = tempfile.mkdtemp(prefix="ktray-eval-bench-")
    try:
        model = create_student(args.arch, 10)
        model_dir = os.path.join(work, "model")
        save_model(
            model,
            model_dir,
            {
                "kind": "student",
                "arch": args.arch,
                "num_classes": 10,
                "img_size": args.size,
                "mean": [0.5] * 3,
                "std": [0.5] * 3,
            },
        )
        test = read_idx(args.fmnist, "test")
        cfg = load_config(
            None,
            [
                f"out={work}/run",
                "infer.actors=1",
                "ray.num_cpus=2",
                "infer.cpus_per_actor=1",
                "infer.decode_cpus=1",
            ],
        )
        ensure_ray(cfg.ray)
        rows = []
        for n in (int(v) for v in args.sizes.split(",")):
            uri = os.path.join(work, f"test-{n}.parquet")
            storage.write_parquet(uri, test.slice(0, n))
            start = time.perf_counter()
            a = evaluate_model_dir(model_dir, uri, 256, num_classes=10)
            local = time.perf_counter() - start
            start = time.perf_counter()
            b = evaluate_distributed(cfg, model_dir, uri, 10)
            dist = time.perf_counter() - start
            assert a["confusion"] == b["confusion"], "the two paths disagree"
            rows.append((n, local, dist))
        print(
            f"\nmodel {args.arch} @ {args.size}px, Fashion-MNIST test images, load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        print(
            f"{'images':>7s} {'local s':>8s} {'img/s':>7s} {'Ray Data s':>10s} {'img/s':>7s} "
            f"{'Ray/local':>9s}"
        )
        for n, local, dist in rows:
            print(
                f"{n:7d} {local:8.2f} {n / local:7.0f} {dist:10.2f} {n / dist:7.0f} "
                f"{local / dist:9.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
