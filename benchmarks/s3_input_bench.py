"""Distillation input from S3 with network latency: img/s of the distill stage's input path.

A real S3 server on loopback (SeaweedFS, else moto: ``tests/servers.py``) behind a proxy
that holds every chunk ``--delays`` ms each way (``latency_proxy.py``: a GET's first byte
comes a round trip later, bandwidth unlimited, as S3 within a region, ~10-30 ms). A view table
in the logits stage's layout (2,048-row parts in 64-row groups, an image's views adjacent,
rows in the images' order) points at JPEGs in Parquet image shards (``--shards``; or webdataset
tar shards, ``--tar``; or a file each, ``--files``); both are uploaded. Sets of more shards
than a decode process keeps open (``--shards 200``) show what a web-scale set gets. For
each ``train.stripes`` and each delay the driver describes the table (footers over S3) and
iterates the distill stage's dataset (``ktray.stages.train_data.view_dataset``: decode actors
that read the stripes and the image row groups over S3) for one epoch; the same table on local
disk is the reference row. Columns: seconds to describe the table, seconds to the first batch,
img/s over the whole epoch (its start included; the median of ``--repeat`` runs), and the
ratio to local disk measured in the same run. Usage:

    python benchmarks/s3_input_bench.py [--rows 96000] [--images 16000] [--delays 0,10,25]
                                        [--stripes 1,32] [--size 64] [--shards 8]
                                        [--tar | --files] [config overrides]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository: tests.servers

from input_bench import wait_idle  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402
from scale_bench import make_images, make_logits  # noqa: E402


def run_median(repeat: int, *args) -> dict:
    """:func:`run_once` ``repeat`` times (the machine idle before each): the run of median
    img/s. The S3 server and the proxy share this machine's cores with the decoding, and
    single runs here vary by ~10%."""
    runs = []
    for _ in range(repeat):
        wait_idle()
        runs.append(run_once(*args))
    return sorted(runs, key=lambda m: m["rate"])[len(runs) // 2]


def run_once(uri: str, size: int, spec, batch: int) -> dict:
    """Describe ``uri`` and read one epoch of its decoded views: seconds and img/s."""
    from ktray.data import columns as C
    from ktray.stages.train_data import describe_targets, view_dataset

    t0 = time.perf_counter()
    info = describe_targets(uri, C.LOGITS)
    described = time.perf_counter() - t0
    ds = view_dataset(uri, info["columns"], {"x": size}, spec, seed=0, described=info)
    t0 = time.perf_counter()
    n, first = 0, None
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
        first = time.perf_counter() - t0 if first is None else first
        n += len(b["x"])
    # the whole epoch, its start included: decode actors that start ahead of the first batch
    # fill the object store meanwhile, and a rate from the first batch on counts that twice
    rate = n / max(1e-9, time.perf_counter() - t0)
    return {"describe_s": described, "first_s": first or 0.0, "rate": rate, "images": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96_000, help="view rows (one epoch)")
    ap.add_argument("--images", type=int, default=16_000, help="JPEGs the rows point at")
    ap.add_argument("--shards", type=int, default=8, help="Parquet image shards")
    ap.add_argument("--group-rows", type=int, default=64, help="images per image row group")
    ap.add_argument(
        "--files", action="store_true", help="a .jpg file each image instead of Parquet shards"
    )
    ap.add_argument("--tar", action="store_true", help="webdataset tar shards instead of Parquet")
    ap.add_argument("--side", type=int, default=96, help="JPEG side in pixels")
    ap.add_argument("--size", type=int, default=64, help="student input side")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--delays", default="0,10,25", help="ms added each way (round trip: 2x)")
    ap.add_argument("--stripes", default="1,32", help="train.stripes values to compare")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3, help="runs of each row; the median is kept")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.decode_cpus=0.5")
    args = ap.parse_args()

    from ktray.config import load_config
    from ktray.stages.common import ensure_ray
    from ktray.train.specs import DistillSpec
    from tests.servers import ServerUnavailable, start_s3_server

    work = tempfile.mkdtemp(prefix="ktray-s3-input-")
    server = proxy = None
    try:
        try:
            server = start_s3_server(Path(work) / "s3")
        except ServerUnavailable as e:
            sys.exit(f"s3_input_bench: {e}")
        proxy = LatencyProxy("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1]))
        env = server.env()
        env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{proxy.port}"
        os.environ.update(env)  # before Ray starts: its workers inherit it

        local = os.path.join(work, "local")
        sources = make_images(
            local, args.images, args.side, args.shards, args.group_rows, args.files, args.tar
        )
        local_uri = make_logits(local, sources, args.rows, in_order=True)
        bucket = server.url("bench")
        server.fs.put(os.path.join(local, "images"), f"{bucket}/images", recursive=True)
        remote = os.path.join(work, "remote")  # the same rows, their sources on S3
        s3_sources = [s.replace(os.path.join(local, "images"), f"{bucket}/images") for s in sources]
        remote_logits = make_logits(remote, s3_sources, args.rows, in_order=True)
        server.fs.put(remote_logits, f"{bucket}/logits", recursive=True)
        s3_uri = f"{bucket}/logits"

        cfg = load_config(None, [f"out={work}/out", f"ray.num_cpus={args.cpus}", *args.overrides])
        ensure_ray(cfg.ray)
        rows = []
        for stripes in [int(s) for s in args.stripes.split(",")]:
            spec = DistillSpec.from_config(
                load_config(None, [f"out={work}/out", f"train.stripes={stripes}", *args.overrides]),
                "task",
            )
            ref = run_median(args.repeat, local_uri, args.size, spec, args.batch)
            rows.append((stripes, "local disk", ref, 1.0))
            for delay in [float(d) for d in args.delays.split(",")]:
                proxy.set_delay_ms(delay)
                got = run_median(args.repeat, s3_uri, args.size, spec, args.batch)
                rows.append(
                    (stripes, f"S3, {2 * delay:g} ms round trip", got, got["rate"] / ref["rate"])
                )
        layout = (
            "files"
            if args.files
            else f"{args.shards} tar shards"
            if args.tar
            else f"{args.shards} Parquet shards ({args.group_rows}-image row groups)"
        )
        print(
            f"\n{args.rows} view rows -> {args.images} JPEGs of {args.side} px in {layout}, "
            f"views at {args.size} px, {args.cpus} CPUs, S3 server: {server.kind}"
        )
        print(
            f"{'stripes':>7s}  {'input':26s} {'describe s':>10s} {'first batch s':>13s} "
            f"{'img/s':>8s} {'vs local':>8s}"
        )
        for stripes, where, m, ratio in rows:
            print(
                f"{stripes:7d}  {where:26s} {m['describe_s']:10.2f} {m['first_s']:13.2f} "
                f"{m['rate']:8.0f} {ratio:8.2f}"
            )
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
