"""``ktray logits``: teacher predictions over a transfer set with Ray Data.

The transfer set is expanded to one row per (image, view) and cut into shards of
``shard_rows`` rows. Each shard is one Ray Data block; an actor pool of :class:`ShardWriter`
(``num_gpus`` per actor when the cluster has GPUs) predicts a whole shard in mini-batches and
writes ``part-NNNNN.parquet`` atomically. A rerun (or a resumed killed job) skips the shards
whose part file exists, so no row is ever written twice.
"""

from __future__ import annotations

import logging
import math
import os
import time

import pyarrow as pa

from ktray import storage
from ktray.pipeline import manifest
from ktray.config import Config, config_hash
from ktray.predict import Predictor, expand_views
from ktray.stages.common import map_shards
from ktray.pipeline.tasks import read_transfer

log = logging.getLogger("ktray")
SHARD_ROWS = 2048


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class ShardWriter:
    """Ray Data actor: predicts one shard (block) and writes its part file atomically."""

    def __init__(self, model_dir: str, out_dir: str, batch_size: int, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.predictor = Predictor(model_dir, batch_size=batch_size)
        self.out_dir = out_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        shards = sorted(set(batch["shard"].to_pylist()))
        rows, skipped, secs = [], [], []
        for shard in shards:
            start = time.perf_counter()
            part = batch.filter(pa.compute.equal(batch["shard"], shard))
            expected = part["shard_size"][0].as_py()
            if len(part) != expected:  # a shard split across batches would be written partially
                raise RuntimeError(f"shard {shard}: got {len(part)} of {expected} rows")
            table, n_skipped = self.predictor.predict(part)
            storage.write_parquet(storage.join(self.out_dir, part_name(shard)), table)
            rows.append(len(table))
            skipped.append(n_skipped)
            secs.append(time.perf_counter() - start)
        return pa.table({"shard": shards, "rows": rows, "skipped": skipped, "seconds": secs})


def add_shards(rows: pa.Table, shard_rows: int) -> tuple[pa.Table, int]:
    """Number consecutive rows into shards: adds ``shard`` and ``shard_size`` columns (the
    writer checks that it got the whole shard before writing its part file)."""
    n_shards = max(1, math.ceil(len(rows) / shard_rows))
    shard_ids = [i // shard_rows for i in range(len(rows))]
    sizes = [min(shard_rows, len(rows) - s * shard_rows) for s in range(n_shards)]
    rows = rows.append_column("shard", pa.array(shard_ids, pa.int32()))
    rows = rows.append_column("shard_size", pa.array([sizes[s] for s in shard_ids], pa.int32()))
    return rows, n_shards


def logits_dir(cfg: Config, transfer: str) -> str:
    return manifest.stage_dir(cfg.out, "logits", transfer)


def run(cfg: Config, transfer: str = "in_domain", shard_rows: int = SHARD_ROWS) -> dict:
    """Precompute teacher logits + features over transfer set ``transfer``."""
    from ktray.stages import teacher as teacher_stage

    out = logits_dir(cfg, transfer)
    teacher = teacher_stage.run(cfg)
    # a curated set changes with the curate settings: its hash is part of this one
    extra = (_curated_hash(cfg),) if transfer == "curated" else ()
    h = config_hash(cfg.logits, cfg.data, teacher["config_hash"], transfer, *extra)
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("logits[%s]: reusing the finished run in %s", transfer, out)
        return done
    if storage.exists(storage.join(out, manifest.MANIFEST)):
        _drop_parts(out)  # a run finished under other settings: its part files are stale
    started = time.perf_counter()
    table = read_transfer(cfg, transfer)
    rows = expand_views(table, cfg.logits.views, cfg.data.seed, cfg.logits.scale_min)
    rows, n_shards = add_shards(rows, shard_rows)
    storage.makedirs(out)
    fs, path = storage.fs_and_path(out)
    existing = {os.path.basename(p) for p in fs.ls(path, detail=False)} if fs.exists(path) else set()
    pending = [s for s in range(n_shards) if part_name(s) not in existing]
    log.info("logits[%s]: %d rows (%d images x %d views), %d/%d shards to compute",
                transfer, len(rows), len(table), cfg.logits.views, len(pending), n_shards)
    stats = []
    if pending:
        stats = _compute(cfg, teacher["outputs"]["model"], out, rows, pending, shard_rows)
    written = storage.read_parquet(out, columns=["image_id", "view"])
    elapsed = time.perf_counter() - started
    teacher_flops = teacher.get("flops_per_image") or 0.0
    return manifest.write(out, {
        "stage": "logits", "name": transfer, "config_hash": h,
        "outputs": {"parts": out}, "images": len(table), "views": cfg.logits.views,
        "rows": len(written), "skipped": sum(s["skipped"] for s in stats),
        "shards": n_shards, "computed_shards": len(pending), "seconds": elapsed,
        "rows_per_second": sum(s["rows"] for s in stats) / elapsed if stats else None,
        "flops": teacher_flops * sum(s["rows"] + s["skipped"] for s in stats),
        "device_seconds": sum(s["seconds"] for s in stats),
    }, cfg)


def _curated_hash(cfg: Config) -> str:
    uri = storage.join(cfg.out, "curate", manifest.MANIFEST)
    return storage.read_json(uri).get("config_hash", "") if storage.exists(uri) else ""


def _drop_parts(out: str) -> None:
    fs, path = storage.fs_and_path(out)
    for p in fs.ls(path, detail=False):
        if os.path.basename(p).startswith("part-"):
            fs.rm(p)
    fs.rm(storage.fs_and_path(storage.join(out, manifest.MANIFEST))[1])


def _compute(cfg: Config, model_dir: str, out: str, rows: pa.Table, pending: list[int],
             shard_rows: int) -> list[dict]:
    blocks = [rows.slice(s * shard_rows, shard_rows) for s in pending]
    return map_shards(
        cfg, ShardWriter, {"model_dir": model_dir, "out_dir": out,
                           "batch_size": cfg.logits.batch_size}, blocks,
        lambda r: f"logits: shard {r['shard']} done ({r['rows']} rows, {r['skipped']} "
                  f"skipped, {r['seconds']:.1f}s)")
