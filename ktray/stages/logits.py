"""``ktray logits``: teacher predictions over a transfer set with Ray Data.

The transfer set is ordered by file and row (every read sequential; image files of their own
in a hash order, not class by class: :func:`ktray.predict.order_for_reading`), expanded to one
row per (image, view) and cut into shards of ``shard_rows`` rows. Each shard is one Ray Data
block: a CPU stage decodes it and cuts its views to ``uint8`` arrays, then an actor pool of
:class:`LogitsWriter` (``infer.*``: one actor per GPU of the cluster by default) normalises
them on the device, runs the teacher (bf16 on GPU) and writes ``part-NNNNN.parquet``
atomically: logits as float16, features (float16) only when a method needs them. A
``spec.json`` names what the parts were made for: a rerun (or a resumed killed job) computes
only the missing shards of the same spec, and drops parts made under another one
(:mod:`ktray.stages.shards`).
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.data.segmentation import is_segmentation
from ktray.dense_predict import make_predictor
from ktray.pipeline import manifest
from ktray.pipeline.tasks import read_transfer, transfer_identity
from ktray.predict import VIEW_COLUMNS, Predictor, expand_views, order_for_reading
from ktray.stages import decode_tasks, shards

log = logging.getLogger("ktray")
SHARD_ROWS = 2048
GROUP_ROWS = 64
"""Rows per row group of a logits part: distillation reads its rows in stripes from many places
(``train.stripes``; 55-512 rows at 224-64 px), each whole groups, for a piece of a group
re-reads the group. Measured here (1,000 float16 logits a row): 512-row stripes of 2,048-row
groups 61 us a row, of 64-row groups 16 us (as whole 2,048-row groups, 15); 64-row stripes
22 us, against ~3 ms decoding a 224 px view. Parts are ~14% larger than in one group."""


class LogitsWriter(shards.ShardWriter):
    """Ray Data actor: the teacher over one decoded shard -> its logits part file."""

    row_group_rows = GROUP_ROWS

    def __init__(
        self,
        model_dir: str,
        out_dir: str,
        batch_size: int,
        features: bool,
        threads: int = 0,
        dense: dict | None = None,
    ):
        super().__init__({"": out_dir}, threads)
        if dense:  # segmentation: per-pixel logits at logits.dense_size
            self.predictor = make_predictor(
                model_dir, batch_size=batch_size, features=features, **dense
            )
        else:
            self.predictor = Predictor(model_dir, batch_size=batch_size, features=features)
        self.ready()

    def process(self, part: dict) -> tuple[pa.Table, int]:
        rows = pa.table({k: part[k] for k in VIEW_COLUMNS})
        return self.predictor.table(rows, part[shards.PIXELS], part[shards.OK])


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
    identity = transfer_identity(cfg, transfer)
    done = _finished(cfg, transfer, teacher, features, identity)
    if done is not None:
        log.info("logits[%s]: reusing the finished run in %s", transfer, out)
        return done
    h = _hash(cfg, transfer, teacher, features, identity)
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
            **_manifest_head(cfg, transfer, h, out, len(table), features),
            "rows": len(written),
            # an unreadable image skips all its views: views and images counted apart
            "skipped_views": sum(s["skipped"] for s in stats),
            "skipped_images": sum(s["skipped"] for s in stats) // max(1, cfg.logits.views),
            "shards": n_shards,
            "computed_shards": len(pending),
            "seconds": elapsed,
            "rows_per_second": sum(s["rows"] for s in stats) / elapsed if stats else None,
            "flops": teacher_flops * sum(s["rows"] for s in stats),  # (skipped: not run)
            "device_seconds": sum(s["seconds"] for s in stats),
        },
        cfg,
    )


def _manifest_head(
    cfg: Config, transfer: str, h: str, out: str, images: int, features: bool
) -> dict:
    """What every logits manifest starts with (a computed pass or a slice of one)."""
    return {
        "stage": "logits",
        "name": transfer,
        "config_hash": h,
        "outputs": {"parts": out},
        "images": images,
        "views": cfg.logits.views,
        "features": features,
    }


def _hash(cfg: Config, transfer: str, teacher: dict, features: bool, identity: str) -> str:
    """``identity``: :func:`transfer_identity` of ``transfer`` (the task's files, the curate
    run or the URI's listing), asked for once per stage run."""
    # the actor pool (infer.*) and batch size change how, not what, is computed
    what = {"views": cfg.logits.views, "scale_min": cfg.logits.scale_min}
    what.update(_dense(cfg) or {})
    return config_hash(
        config_hash(what, cfg.data, teacher["config_hash"], transfer, identity), features
    )


def _finished(
    cfg: Config, transfer: str, teacher: dict, features: bool, identity: str
) -> dict | None:
    """A finished run for these settings (one with features serves a request without)."""
    for feats in (True,) if features else (True, False):
        done = manifest.load_finished(
            logits_dir(cfg, transfer), _hash(cfg, transfer, teacher, feats, identity)
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
    identity = transfer_identity(cfg, transfer)
    done = _finished(cfg, transfer, teacher, features, identity)
    if done is not None:
        return done
    src = storage.read_json(storage.join(source, manifest.MANIFEST))
    if src.get("views") != cfg.logits.views or (features and not src.get("features")):
        return None
    started = time.perf_counter()
    table = order_for_reading(read_transfer(cfg, transfer))
    ids = pa.array(sorted(set(table[C.IMAGE_ID].to_pylist())), pa.string())
    # Streamed part by part (memory: one source part + one output shard, not the source):
    # a first pass over the id column counts the rows, a second writes the shards.
    files = storage.parquet_parts(source)
    found, n_rows = set(), 0
    for f in files:
        col = storage.read_parquet(f, columns=[C.IMAGE_ID])[C.IMAGE_ID]
        hit = col.filter(pa.compute.is_in(col, value_set=ids))
        found.update(hit.to_pylist())
        n_rows += len(hit)
    missing = len(ids) - len(found)
    if missing > src.get("skipped_images", 0):  # not a subset of the source
        return None
    h = _hash(cfg, transfer, teacher, features, identity)
    n_shards = shards.n_shards(n_rows, shard_rows)
    spec = {"config_hash": h, "shard_rows": shard_rows, "features": features, "sliced_from": source}
    pending = set(shards.prepare(out, spec, n_shards))
    buffer: list[pa.Table] = []
    shard = 0

    def flush(final: bool) -> None:
        nonlocal buffer, shard
        rows = pa.concat_tables(buffer) if buffer else None
        while rows is not None and (len(rows) >= shard_rows or (final and len(rows))):
            if shard in pending:
                part = rows.slice(0, shard_rows)
                uri = storage.join(out, shards.part_name(shard))
                storage.write_parquet(uri, part, GROUP_ROWS)
            rows, shard = rows.slice(shard_rows), shard + 1
        buffer = [rows] if rows is not None and len(rows) else []

    for f in files:
        part = storage.read_parquet(f)
        part = part.filter(pa.compute.is_in(part[C.IMAGE_ID], value_set=ids))
        if not features and C.FEATURES in part.column_names:
            part = part.drop_columns([C.FEATURES])
        buffer.append(part)
        flush(final=False)
    flush(final=True)
    rows = n_rows
    log.info("logits[%s]: %d rows taken from %s", transfer, rows, source)
    return manifest.write(
        out,
        {
            **_manifest_head(cfg, transfer, h, out, len(table), features),
            "rows": rows,
            "skipped_views": missing * cfg.logits.views,
            "skipped_images": missing,
            "shards": n_shards,
            "computed_shards": 0,
            "sliced_from": source,
            "seconds": time.perf_counter() - started,
            "rows_per_second": None,
            "flops": 0.0,
            "device_seconds": 0.0,  # counted once, by the source's manifest
            # this set's share of the source pass: a trial's pretraining compute (the
            # accuracy-vs-compute plot) includes it; compute totals count the source once
            "attributed_flops": (teacher.get("flops_per_image") or 0.0) * rows,
        },
        cfg,
    )


def _dense(cfg: Config) -> dict | None:
    """Segmentation: the stored grids (``logits.dense_size`` / ``dense_feature_size``)."""
    if not is_segmentation(cfg.data.kind):
        return None
    return {"dense_size": cfg.logits.dense_size, "feature_size": cfg.logits.dense_feature_size}


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
        decode_tasks.logits_views,
        {"size": size},
        LogitsWriter,
        {
            "model_dir": model_dir,
            "out_dir": out,
            "batch_size": cfg.logits.batch_size,
            "features": features,
            "dense": _dense(cfg),
        },
        block_bytes=shard_rows * size * size * 3,
        describe=lambda r: (
            f"logits: shard {r['shard']} done ({r['rows']} rows, "
            f"{r['skipped']} skipped, {r['seconds']:.1f}s)"
        ),
    )
