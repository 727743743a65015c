"""``ktray logits``: teacher predictions over a transfer set with Ray Data.

The transfer set is ordered by file and row (every read sequential), expanded to one row per
(image, view) and cut into shards of ``shard_rows`` rows. Each shard is one Ray Data block: a
CPU stage decodes it and cuts its views to ``uint8`` arrays, then an actor pool of
:class:`LogitsWriter` (``infer.*``: one actor per GPU of the cluster by default) normalises them
on the device, runs the teacher (bf16 on GPU) and writes ``part-NNNNN.parquet`` atomically:
logits as float16, features (float16) only when a method needs them. A ``spec.json`` names what
the parts were made for: a rerun (or a resumed killed job) computes only the missing shards of
the same spec, and drops parts made under another one (:mod:`ktray.stages.shards`).
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.pipeline import manifest
from ktray.pipeline.tasks import read_transfer
from ktray.predict import VIEW_COLUMNS, Predictor, decode_views, expand_views, order_for_reading
from ktray.stages import shards

log = logging.getLogger("ktray")
SHARD_ROWS = 2048


class LogitsWriter(shards.ShardWriter):
    """Ray Data actor: the teacher over one decoded shard -> its logits part file."""

    def __init__(
        self, model_dir: str, out_dir: str, batch_size: int, features: bool, threads: int = 0
    ):
        super().__init__({"": out_dir}, threads)
        self.predictor = Predictor(model_dir, batch_size=batch_size, features=features)

    def process(self, part: dict) -> tuple[pa.Table, int]:
        rows = pa.table({k: part[k] for k in VIEW_COLUMNS})
        return self.predictor.table(rows, part[shards.PIXELS], part[shards.OK])


def decode_shard(block: pa.Table, size: int) -> dict:
    """Decode stage (CPU task): one shard's views as ``uint8 [N, size, size, 3]``."""
    pixels, ok = decode_views(block, size)
    cols = {
        k: block[k].to_numpy(zero_copy_only=False)
        for k in (*VIEW_COLUMNS, shards.SET, shards.SHARD)
    }
    return shards.decoded(cols, pixels, ok)


def needs_features(cfg: Config, transfer: str) -> bool:
    """Whether the logits of ``transfer`` store features: ``logits.features``, a
    ``features@transfer`` method, or ``distill.objective=features``."""
    return bool(
        cfg.logits.features
        or f"features@{transfer}" in cfg.methods
        or cfg.distill.objective == "features"
    )


def logits_dir(cfg: Config, transfer: str) -> str:
    return manifest.stage_dir(cfg.out, "logits", transfer)


def run(
    cfg: Config,
    transfer: str = "in_domain",
    shard_rows: int = SHARD_ROWS,
    features: bool | None = None,
) -> dict:
    """Precompute the teacher's logits (+ features when needed) over transfer set ``transfer``.

    Args:
        features: store features too; None = :func:`needs_features`. A finished run with
            features serves a request without them.
    """
    from ktray.stages import teacher as teacher_stage

    out = logits_dir(cfg, transfer)
    features = needs_features(cfg, transfer) if features is None else features
    teacher = teacher_stage.run(cfg)
    done = _finished(cfg, transfer, teacher, features)
    if done is not None:
        log.info("logits[%s]: reusing the finished run in %s", transfer, out)
        return done
    h = _hash(cfg, transfer, teacher, features)
    started = time.perf_counter()
    table = order_for_reading(read_transfer(cfg, transfer))
    rows = expand_views(table, cfg.logits.views, cfg.data.seed, cfg.logits.scale_min)
    n_shards = shards.n_shards(len(rows), shard_rows)
    spec = {
        "config_hash": h,
        "shard_rows": shard_rows,
        "features": features,
        "rows": shards.fingerprint(rows, (C.IMAGE_ID, C.SOURCE)),
    }
    done_uri = storage.join(out, manifest.MANIFEST)
    if storage.exists(done_uri):  # finished under other settings: not finished any more
        fs, path = storage.fs_and_path(done_uri)
        fs.rm(path)
    pending = shards.prepare(out, spec, n_shards)
    log.info(
        "logits[%s]: %d rows (%d images x %d views), %d/%d shards to compute",
        transfer,
        len(rows),
        len(table),
        cfg.logits.views,
        len(pending),
        n_shards,
    )
    stats = []
    if pending:
        stats = _compute(cfg, teacher["outputs"]["model"], out, rows, pending, shard_rows, features)
    written = storage.read_parquet(out, columns=[C.IMAGE_ID])
    elapsed = time.perf_counter() - started
    teacher_flops = teacher.get("flops_per_image") or 0.0
    return manifest.write(
        out,
        {
            "stage": "logits",
            "name": transfer,
            "config_hash": h,
            "outputs": {"parts": out},
            "images": len(table),
            "views": cfg.logits.views,
            "features": features,
            "rows": len(written),
            "skipped": sum(s["skipped"] for s in stats),
            "shards": n_shards,
            "computed_shards": len(pending),
            "seconds": elapsed,
            "rows_per_second": sum(s["rows"] for s in stats) / elapsed if stats else None,
            "flops": teacher_flops * sum(s["rows"] + s["skipped"] for s in stats),
            "device_seconds": sum(s["seconds"] for s in stats),
        },
        cfg,
    )


def _hash(cfg: Config, transfer: str, teacher: dict, features: bool) -> str:
    # a curated set changes with the curate settings: its hash is part of this one
    extra = (_curated_hash(cfg),) if transfer == "curated" else ()
    # the actor pool (infer.*) and batch size change how, not what, is computed
    what = {"views": cfg.logits.views, "scale_min": cfg.logits.scale_min}
    return config_hash(
        config_hash(what, cfg.data, teacher["config_hash"], transfer, *extra), features
    )


def _finished(cfg: Config, transfer: str, teacher: dict, features: bool) -> dict | None:
    """A finished run for these settings (one with features serves a request without)."""
    for feats in (True,) if features else (True, False):
        done = manifest.load_finished(
            logits_dir(cfg, transfer), _hash(cfg, transfer, teacher, feats)
        )
        if done is not None:
            return done
    return None


def slice_from(
    cfg: Config,
    transfer: str,
    source: str,
    shard_rows: int = SHARD_ROWS,
    features: bool | None = None,
) -> dict | None:
    """The logits of ``transfer`` taken from the finished logits set ``source`` (a larger
    transfer set under the same teacher, views and seed, e.g. the largest size of a transfer-
    size sweep) instead of recomputed: views depend only on (seed, image id, view), so the
    rows of the images of ``transfer`` are exactly what a pass would compute. Returns the
    manifest, or None when ``source`` does not hold every image (then compute with
    :func:`run`)."""
    from ktray.stages import teacher as teacher_stage

    out = logits_dir(cfg, transfer)
    features = needs_features(cfg, transfer) if features is None else features
    teacher = teacher_stage.run(cfg)
    done = _finished(cfg, transfer, teacher, features)
    if done is not None:
        return done
    src = storage.read_json(storage.join(source, manifest.MANIFEST))
    if src.get("views") != cfg.logits.views or (features and not src.get("features")):
        return None
    started = time.perf_counter()
    table = order_for_reading(read_transfer(cfg, transfer))
    ids = pa.array(sorted(set(table[C.IMAGE_ID].to_pylist())), pa.string())
    rows = storage.read_parquet(source)
    rows = rows.filter(pa.compute.is_in(rows[C.IMAGE_ID], value_set=ids))
    missing = len(ids) - len(set(rows[C.IMAGE_ID].to_pylist()))
    if missing * cfg.logits.views > src.get("skipped", 0):  # not a subset of the source
        return None
    if not features and C.FEATURES in rows.column_names:
        rows = rows.drop_columns([C.FEATURES])
    h = _hash(cfg, transfer, teacher, features)
    n_shards = shards.n_shards(len(rows), shard_rows)
    spec = {"config_hash": h, "shard_rows": shard_rows, "features": features, "sliced_from": source}
    for s in shards.prepare(out, spec, n_shards):
        storage.write_parquet(
            storage.join(out, shards.part_name(s)), rows.slice(s * shard_rows, shard_rows)
        )
    log.info("logits[%s]: %d rows taken from %s", transfer, len(rows), source)
    return manifest.write(
        out,
        {
            "stage": "logits",
            "name": transfer,
            "config_hash": h,
            "outputs": {"parts": out},
            "images": len(table),
            "views": cfg.logits.views,
            "features": features,
            "rows": len(rows),
            "skipped": missing * cfg.logits.views,
            "shards": n_shards,
            "computed_shards": 0,
            "sliced_from": source,
            "seconds": time.perf_counter() - started,
            "rows_per_second": None,
            "flops": 0.0,
            "device_seconds": 0.0,  # counted once, by the source's manifest
            # this set's share of the source pass: a trial's pretraining compute (the
            # accuracy-vs-compute plot) includes it; compute totals count the source once
            "attributed_flops": (teacher.get("flops_per_image") or 0.0) * len(rows),
        },
        cfg,
    )


def _curated_hash(cfg: Config) -> str:
    uri = storage.join(cfg.out, "curate", manifest.MANIFEST)
    return storage.read_json(uri).get("config_hash", "") if storage.exists(uri) else ""


def _compute(
    cfg: Config,
    model_dir: str,
    out: str,
    rows: pa.Table,
    pending: list[int],
    shard_rows: int,
    features: bool,
) -> list[dict]:
    size = int(storage.read_json(storage.join(model_dir, "model.json"))["img_size"])
    blocks = [shards.shard_block(rows, "", s, shard_rows) for s in pending]
    return shards.map_shards(
        cfg,
        blocks,
        decode_shard,
        {"size": size},
        LogitsWriter,
        {
            "model_dir": model_dir,
            "out_dir": out,
            "batch_size": cfg.logits.batch_size,
            "features": features,
        },
        block_bytes=shard_rows * size * size * 3,
        describe=lambda r: (
            f"logits: shard {r['shard']} done ({r['rows']} rows, "
            f"{r['skipped']} skipped, {r['seconds']:.1f}s)"
        ),
    )
