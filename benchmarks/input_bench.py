"""Distillation input throughput: img/s the Ray Data path delivers to the training loop.

Rows: (1) the ceiling: ``--cpus`` plain processes (no Ray) each decoding + view-cropping the
same rows with ``DecodeViews``, run side by side, i.e. bare decode-per-core x cores measured
at once; (2) the distill stage's path (``view_dataset`` -> ``TorchTrainer(datasets=...)`` in
Train V2 local mode -> ``iter_torch_batches`` with the local shuffle buffer and prefetching ->
uint8 batches) feeding a no-op model, measured from the first batch to the end of one epoch.
Goal: delivered >= 0.8 x the ceiling. This machine's decode rate drifts by up to 2x within
minutes (other tenants), so the ceiling is sampled right before and right after each run and
each run is divided by the mean of the two: the ratio compares what the cores could do then
with what the path delivered then. The uint8 -> normalised float step is the model's first op
and runs on its device (the GPU in training); ``--normalize`` adds it on this CPU too, where
it competes with the decode tasks for the same cores. Measure steady state: the decode tasks
start before the trainer's first batch, and the views they decode meanwhile are delivered at
once, so a short window overstates the rate (20k rows of 64-px views read 1.09 x the ceiling,
which no steady state can; 100k rows read 0.66). Hence the default 100k rows (36k for 192-px
views is ~30 s a run). Usage:

    python benchmarks/input_bench.py [--rows 100000] [--batch 128] [--side 96] [--size 64]
                                     [--normalize] [config overrides, e.g. train.shuffle_buffer=0]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale_bench import make_images, make_logits  # noqa: E402

BARE_ROWS = 2048
"""Rows each bare process decodes per ceiling sample (~0.5-1 s at 64 px)."""
CEILING_SAMPLES = 5
"""Ceiling samples before and after each run (the median of each side is kept)."""

_bare: dict = {}


def _bare_init(uri: str, columns: list[str], size: int) -> None:
    """A bare process: the rows it decodes, read once (the file cache stays warm)."""
    import pyarrow.parquet as pq

    from ktray.data.decode import DecodeViews

    _bare["decode"] = DecodeViews({"x": size}, ["logits"])
    _bare["table"] = pq.read_table(uri, columns=columns).slice(0, BARE_ROWS)
    _bare["decode"](_bare["table"].slice(0, 256))  # warm: open shards, first decode


def _bare_pass(_: int) -> int:
    from ktray.data import sources

    sources.clear_cache()  # as a decode task starts: shards opened afresh
    table = _bare["table"]
    for i in range(0, len(table), 256):
        _bare["decode"](table.slice(i, 256))
    return len(table)


def wait_idle(limit_s: float = 30.0, busy_max: float = 0.1) -> float:
    """Wait until this machine's CPUs are idle (busy < ``busy_max`` over 0.5 s, from
    /proc/stat; Ray's processes wind down for seconds after a run); returns the seconds
    waited. Elsewhere than Linux it returns at once."""
    if not os.path.exists("/proc/stat"):
        return 0.0

    def times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        total0, idle0 = times()
        time.sleep(0.5)
        total1, idle1 = times()
        if 1 - (idle1 - idle0) / max(1, total1 - total0) < busy_max:
            break
    return time.perf_counter() - t0


class Ceiling:
    """``cpus`` plain processes decoding side by side: what the cores can do right now.
    Forked before Ray starts, so they carry none of its threads; idle between samples."""

    def __init__(self, cpus: int, initargs: tuple, init=None, work=None):
        """``init(*initargs)`` readies each process, ``work(_)`` decodes once and returns the
        images it decoded (by default :func:`_bare_init` and :func:`_bare_pass`)."""
        self.cpus, self.work = cpus, work or _bare_pass
        ctx = multiprocessing.get_context("fork")
        self.pool = ctx.Pool(cpus, initializer=init or _bare_init, initargs=initargs)
        self.pool.map(self.work, range(cpus))  # all warm before the first sample

    def sample(self) -> float:
        """img/s of all the processes together over one pass each (median of a few)."""
        rates = []
        for _ in range(CEILING_SAMPLES):
            t = time.perf_counter()
            n = sum(self.pool.map(self.work, range(self.cpus), chunksize=1))
            rates.append(n / (time.perf_counter() - t))
        return sorted(rates)[len(rates) // 2]

    def close(self) -> None:
        self.pool.terminate()


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
    ap.add_argument("--repeat", type=int, default=3, help="runs of the path; the median is kept")
    ap.add_argument(
        "--normalize",
        action="store_true",
        help="also convert each batch to normalised float32 on this CPU (the device's job)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.shuffle_buffer=0")
    args = ap.parse_args()

    from ktray.config import load_config
    from ktray.stages.common import ensure_ray, fit
    from ktray.stages.train_data import describe_targets, view_dataset
    from ktray.train.specs import DistillSpec

    work = tempfile.mkdtemp(prefix="ktray-input-")
    ceiling = None
    try:
        images = make_images(work, args.images, side=args.side)
        uri = make_logits(work, images, args.rows, part_rows=args.part_rows)
        info = describe_targets(uri, "logits")
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
        ceiling = Ceiling(args.cpus, (uri, info["columns"], args.size))  # before Ray starts
        ensure_ray(cfg.ray)
        runs = []
        for r in range(args.repeat):  # each run: a fresh dataset and trainer
            wait_idle()
            before = ceiling.sample()
            ds = view_dataset(
                uri, info["columns"], {"x": args.size}, spec, seed=spec.seed, described=info
            )
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
            waited = wait_idle()  # the run's processes wind down
            after = ceiling.sample()
            delivered = m["images"] / m["seconds"]
            bare = (before + after) / 2
            runs.append((delivered / bare, delivered, bare, before, after, m, wall, waited))
        runs.sort(key=lambda run: run[0])
        ratio, delivered, bare, _, _, m, wall, _ = runs[len(runs) // 2]  # the median run
        print(
            f"\n{args.rows} rows -> {args.images} JPEGs of {args.side} px, views at "
            f"{args.size} px, batch {args.batch}, {args.cpus} CPUs, "
            f"decode_cpus {spec.decode_cpus}, shuffle buffer {spec.shuffle_buffer}, "
            f"prefetch {spec.prefetch_batches}"
        )
        print(f"{'path (the run of median ratio)':52s} {'img/s':>8s} {'vs ceiling':>10s}")
        print(
            f"{f'bare decode + crop, {args.cpus} processes at once (no Ray)':52s} "
            f"{bare:8.1f} {1.0:10.2f}"
        )
        what = "float on this CPU" if args.normalize else "uint8"
        print(
            f"{f'Ray Data -> Train local mode -> no-op ({what})':52s} {delivered:8.1f} "
            f"{ratio:10.2f}"
        )
        print(f"each run: ratio (delivered img/s / ceiling before, after), of {args.repeat}:")
        for run in sorted(runs, key=lambda run: run[0]):
            print(
                f"  {run[0]:.2f} ({run[1]:.0f} / {run[3]:.0f}, {run[4]:.0f}; idle "
                f"{run[7]:.1f} s after the run)"
            )
        print(
            f"(median run: first batch after {m['first_s']:.1f} s, {m['images']} images "
            f"measured, wall {wall:.1f} s)"
        )
    finally:
        if ceiling is not None:
            ceiling.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
