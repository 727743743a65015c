"""Distillation memory at transfer-set scale: peak RSS at N = 50k vs 1M logits rows.

Synthesizes a few thousand small JPEGs in Parquet image shards (img2dataset layout) and a
logits table of N rows x 1,000 classes (float16) whose rows point at those images, then runs
the distill stage's own input path (``ktray.stages.train_data.view_dataset`` ->
``TorchTrainer(datasets=...)`` -> ``iter_torch_batches``) with a tiny student for a fixed
number of steps, each N in a fresh process. Prints the peak RSS of the driver and of the
training process (the same process in Train V2 local mode, ``--workers 0``), the peak of Ray's
object store (plasma) use sampled every 0.5 s with what was spilled to disk, and the
delivered img/s. Goal: peak RSS at 1M <= 1.25 x at 50k; the object store must not grow with
N either (a barrier in the input path, such as ``randomize_block_order`` on the Parquet read,
puts the whole table there first). Usage:

    python benchmarks/scale_bench.py [--sizes 50000,1000000] [--steps 40] [--workers 0]
                                     [--part-rows 2048]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLASSES = 1000
PART_ROWS = 2048
"""Rows per logits part: the logits stage's (``ktray.stages.logits.SHARD_ROWS``). Releases
before the 64-row groups used 50,000-row parts here."""
GROUP_ROWS = 64
"""Rows per row group of a logits part (``ktray.stages.logits.GROUP_ROWS``)."""


def make_images(
    work: str,
    n: int = 3000,
    side: int = 48,
    shards: int = 3,
    group_rows: int = 100,
    files: bool = False,
    tar: bool = False,
) -> list[str]:
    """``n`` small JPEGs in ``shards`` Parquet files (column ``jpg``, row groups of
    ``group_rows``), with ``files`` a ``.jpg`` file each, or with ``tar`` in ``shards``
    webdataset tars (members ``NNNNNN.jpg``); returns their sources (``URI#ROW``, the files'
    paths or ``URI#MEMBER``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    sources, per = [], -(-n // shards)
    for s in range(shards):
        blobs = []
        for _ in range(min(per, n - s * per)):
            a = rng.integers(0, 255, (side // 4, side // 4, 3), dtype=np.uint8)
            img = Image.fromarray(a).resize((side, side), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            blobs.append(buf.getvalue())
        if files:
            for i, blob in enumerate(blobs):
                path = os.path.join(work, "images", f"{s:03d}-{i:06d}.jpg")
                with open(path, "wb") as f:
                    f.write(blob)
                sources.append(path)
            continue
        if tar:
            uri = os.path.join(work, "images", f"shard-{s:03d}.tar")
            with tarfile.open(uri, "w") as tf:
                for i, blob in enumerate(blobs):
                    info = tarfile.TarInfo(f"{i:06d}.jpg")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
            sources += [f"{uri}#{i:06d}.jpg" for i in range(len(blobs))]
            continue
        uri = os.path.join(work, "images", f"shard-{s:03d}.parquet")
        pq.write_table(
            pa.table({"jpg": pa.array(blobs, pa.binary())}), uri, row_group_size=group_rows
        )
        sources += [f"{uri}#{i}" for i in range(len(blobs))]
    return sources


def make_logits(
    work: str, sources: list[str], rows: int, part_rows: int = PART_ROWS, in_order: bool = False
) -> str:
    """``rows`` view rows over ``sources`` with float16 logits, in parts of ``part_rows``: each
    row's image drawn at random, or with ``in_order`` the images in their order, an image's
    views adjacent (as the logits stage writes a set it read shard by shard)."""
    from ktray.storage import dictionary_columns

    out = os.path.join(work, f"logits-{rows}")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1)
    block = rng.standard_normal((part_rows, CLASSES), dtype=np.float32).astype(np.float16)
    src = np.asarray(sources, dtype=object)
    for p in range(-(-rows // part_rows)):
        n = min(part_rows, rows - p * part_rows)
        idx = rng.integers(0, len(src), n)
        if in_order:
            idx = (np.arange(p * part_rows, p * part_rows + n) * len(src)) // rows
        x0 = rng.uniform(0, 0.3, n).astype(np.float32)
        y0 = rng.uniform(0, 0.3, n).astype(np.float32)
        table = pa.table(
            {
                "image_id": pa.array([f"r{p}-{i}" for i in range(n)]),
                "source": pa.array(src[idx].tolist(), pa.string()),
                "x0": x0,
                "y0": y0,
                "x1": x0 + 0.7,
                "y1": y0 + 0.7,
                "flip": rng.random(n) < 0.5,
                "logits": pa.FixedSizeListArray.from_arrays(
                    pa.array(block[:n].reshape(-1)), CLASSES
                ),
            }
        )
        pq.write_table(
            table,
            os.path.join(out, f"part-{p:05d}.parquet"),
            compression="none",
            row_group_size=GROUP_ROWS,  # as the logits stage writes them
            use_dictionary=dictionary_columns(table.schema),  # (and so)
        )
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class PlasmaPeak:
    """Samples this Ray node's object store use (``memory_summary``) in a thread: the peak
    MiB in plasma and the most spilled to disk."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.peak, self.spilled = every, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import re

        from ray._private.internal_api import memory_summary

        while not self._stop.is_set():
            text = memory_summary(stats_only=True)
            used = re.search(r"Plasma memory usage (\d+) MiB", text)
            spilled = re.search(r"Spilled (\d+) MiB", text)
            self.peak = max(self.peak, float(used.group(1)) if used else 0.0)
            self.spilled = max(self.spilled, float(spilled.group(1)) if spilled else 0.0)
            self._stop.wait(self.every)

    def __enter__(self) -> PlasmaPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_worker(config: dict) -> dict:
    """The distill stage's worker, plus this process's peak RSS."""
    from ktray.stages.train_stage import train_worker

    metrics = train_worker(config)
    metrics["worker_peak_rss_gib"] = peak_rss_gib()
    return metrics


def child(args) -> dict:
    """One N, in this (fresh) process."""
    import dataclasses

    from ktray.config import load_config
    from ktray.stages.common import ensure_ray, fit
    from ktray.stages.train_data import describe_targets, view_dataset
    from ktray.train.specs import DistillSpec

    cfg = load_config(
        None,
        [
            f"out={args.work}/out-{args.child}",
            "ray.num_cpus=2",
            f"ray.num_workers={args.workers}",
            "student.arch=test_resnet",
            "student.img_size=32",
            f"distill.steps={args.steps}",
            f"distill.batch_size={args.batch}",
            "train.report_every=1000000",
            "train.checkpoint_every=1000000",
            "distill.warmup_steps=1",
        ],
    )
    ensure_ray(cfg.ray)
    spec = DistillSpec.from_config(cfg, "task")
    uri = os.path.join(args.work, f"logits-{args.child}")
    info = describe_targets(uri, "logits")
    ds = view_dataset(
        uri,
        info["columns"],
        {"x": spec.student_img_size},
        spec,
        seed=spec.seed,
        described=info,
        steps=spec.steps,
    )
    inputs = {
        "out_dir": os.path.join(args.work, f"model-{args.child}"),
        "num_classes": CLASSES,
        "rows": info["rows"],
        "passes": ds.passes,
    }
    start = time.perf_counter()
    with PlasmaPeak() as plasma:
        m = fit(
            cfg,
            f"scale-{args.child}",
            bench_worker,
            {"spec": dataclasses.asdict(spec), "inputs": inputs},
            datasets={"train": ds},
        )
    wall = time.perf_counter() - start
    return {
        "rows": info["rows"],
        "images": m["images"],
        "loop_s": m["seconds"],
        "wall_s": wall,
        "driver_gib": peak_rss_gib(),
        "worker_gib": m["worker_peak_rss_gib"],
        "plasma_mib": plasma.peak,
        "spilled_mib": plasma.spilled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50000,1000000")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument(
        "--part-rows",
        type=int,
        default=PART_ROWS,
        help="rows per logits part (2,048: what the logits stage writes)",
    )
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="ktray-scale-")
    try:
        t = time.perf_counter()
        sources = make_images(work, args.images)
        for n in sizes:
            make_logits(work, sources, n, part_rows=args.part_rows)
        print(
            f"synthesized {args.images} JPEGs + logits tables {sizes} in "
            f"{time.perf_counter() - t:.0f} s"
        )
        rows = []
        for n in sizes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--work",
                work,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--workers",
                str(args.workers),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
            if not line:
                sys.exit(f"N={n} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
        base = rows[0]
        mode = (
            "local mode (driver = training process)"
            if args.workers == 0
            else f"{args.workers} Ray Train worker(s)"
        )
        print(
            f"\ndistill, test_resnet @ 32 px, batch {args.batch}, {args.steps} steps, "
            f"{CLASSES} classes float16, {args.images} JPEGs, {mode}"
        )
        print(
            f"{'rows':>9s} {'logits GiB':>10s} {'driver peak GiB':>15s} "
            f"{'train proc peak GiB':>19s} {'vs first':>8s} {'plasma peak MiB':>15s} "
            f"{'spilled MiB':>11s} {'img/s':>7s} {'wall s':>7s}"
        )
        for r in rows:
            print(
                f"{r['rows']:9d} {r['rows'] * CLASSES * 2 / 2**30:10.2f} "
                f"{r['driver_gib']:15.2f} {r['worker_gib']:19.2f} "
                f"{r['worker_gib'] / base['worker_gib']:8.2f} "
                f"{r['plasma_mib']:15.0f} {r['spilled_mib']:11.0f} "
                f"{r['images'] / r['loop_s']:7.1f} {r['wall_s']:7.1f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
