"""``ktray curate``: a transfer set curated from a gallery by query-balanced crop retrieval.

Queries are the task's labeled train images; protected images (labeled train, val and test)
must never leak into the transfer set, so gallery images that nearly duplicate them are
excluded. Three image sets are embedded as crops (:mod:`ktray.retrieval.embed`): ``queries``
(train), ``protected`` (val + test; the full image unless ``curate.protect_crops``) and
``gallery`` (ordered by file and row, so its reads are sequential). Each set is cut into
shards of ``curate.shard_rows`` images; every shard is one Ray Data block: a CPU stage decodes
it and cuts its crops to ``uint8`` arrays, and an actor pool of :class:`EmbedWriter`
(``infer.*``) embeds them and writes ``OUT/curate/embeddings/<set>/part-NNNNN.parquet``
atomically (:mod:`ktray.stages.shards`). A rerun (or a resumed killed job) computes only the
missing shards; a ``spec.json`` per set drops part files made under other settings. Then a
FAISS index over the gallery crops (trained on a sample, filled part by part), near-duplicate
removal, balanced selection, and
``OUT/curate/transfer_set.parquet`` + report files + ``manifest.json`` (last).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.errors import KtrayError
from ktray.pipeline import curation, manifest
from ktray.pipeline.curation_report import write_report
from ktray.pipeline.tasks import prepare_task
from ktray.predict import order_for_reading
from ktray.retrieval.embed import (
    GALLERY_INDEX,
    CropScheme,
    Embedder,
    EncoderSpec,
    decode_crops,
    encoder_from_config,
    flops_per_crop,
    vectors,
)
from ktray.stages import shards

log = logging.getLogger("ktray")
SETS = ("queries", "protected", "gallery")


def curate_dir(cfg: Config) -> str:
    return manifest.stage_dir(cfg.out, "curate")


class EmbedWriter(shards.ShardWriter):
    """Ray Data actor: embeds the decoded crops of one shard and writes its part file."""

    def __init__(self, encoder: dict, out_dirs: dict, batch_size: int, threads: int = 0):
        super().__init__(out_dirs, threads)
        self.embedder = Embedder(EncoderSpec(**encoder), batch_size=batch_size)

    def process(self, part: dict) -> tuple[pa.Table, int]:
        return self.embedder.table(part, part[shards.PIXELS], part[shards.OK])


def _scheme(d: dict) -> CropScheme:
    return CropScheme(**dict(d, scales=tuple(d["scales"])))


def decode_shard(block: pa.Table, schemes: dict, size: int) -> dict:
    """Decode stage (CPU task): one shard's crops as ``uint8 [N, size, size, 3]``."""
    name = block[shards.SET][0].as_py()
    cols, pixels, ok = decode_crops(block, _scheme(schemes[name]), size)
    n = len(ok)
    cols[shards.SET] = [name] * n
    cols[shards.SHARD] = [block[shards.SHARD][0].as_py()] * n
    return shards.decoded(cols, pixels, ok)


def run(cfg: Config) -> dict:
    """Curate (or reuse) ``OUT/curate/transfer_set.parquet``; returns the manifest."""
    cur = cfg.curate
    out = curate_dir(cfg)
    encoder = encoder_from_config(cfg)
    h = config_hash(cfg.curate, cfg.data, encoder.as_dict())
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("curate: reusing the finished run in %s", out)
        return done
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # Everything that can fail on bad input fails here, before Ray work starts.
    curation.check_config(cfg)
    info = prepare_task(cfg)
    gallery = curation.gallery_table(cfg)
    query_scheme = CropScheme(cur.random_crops, cur.grid, tuple(cur.scales), cfg.data.seed)
    sets = {
        "queries": (curation.indexed(curation.split(info, "train")), query_scheme),
        "protected": (
            curation.indexed(curation.split(info, "val"), curation.split(info, "test")),
            query_scheme if cur.protect_crops else CropScheme(full_only=True),
        ),
        "gallery": (order_for_reading(curation.indexed(gallery)), query_scheme),
    }
    if not len(sets["queries"][0]):
        raise KtrayError("curate needs labeled train images as queries; there are none")
    fpc = flops_per_crop(encoder)  # also builds the encoder once: a bad name fails here
    timings["prepare"] = time.perf_counter() - started

    t0 = time.perf_counter()
    dirs = {name: storage.join(out, "embeddings", name) for name in SETS}
    blocks, n_shards = [], {}
    for name, (table, scheme) in sets.items():
        spec = {
            "encoder": encoder.as_dict(),
            "scheme": scheme.as_dict(),
            "shard_rows": cur.shard_rows,
            "images": shards.fingerprint(table, (C.IMAGE_ID, C.SOURCE)),
        }
        n_shards[name] = math.ceil(len(table) / cur.shard_rows)
        pending = shards.prepare(dirs[name], spec, n_shards[name])
        blocks += [_block(table, name, s, cur.shard_rows) for s in pending]
    log.info(
        "curate: %d queries, %d protected, %d gallery images; %d shards to embed",
        *(len(sets[n][0]) for n in SETS),
        len(blocks),
    )
    stats = (
        _compute(
            cfg,
            encoder,
            {n: s.as_dict() for n, (_, s) in sets.items()},
            dirs,
            blocks,
            query_scheme.crops_per_image(),
        )
        if blocks
        else []
    )
    timings["embed"] = time.perf_counter() - t0

    q, p, parts, image_of_vector, crops, skipped = _read_embeddings(dirs, sets)
    query_vecs = vectors(q)
    dim = query_vecs.shape[1]
    full = np.array([b == (0.0, 0.0, 1.0, 1.0) for b in zip(*(q[k].to_pylist() for k in C.BOX))])
    protected_vecs = query_vecs if cur.protect_crops else query_vecs[full]
    if p is not None:
        protected_vecs = np.concatenate([protected_vecs, vectors(p)])
    # Index (recall measured), exact leak protection, gallery self-dedup, balanced selection.
    res = curation.index_and_select(
        cfg, out, query_vecs, q[C.IMAGE_ID].to_pylist(), protected_vecs, parts, image_of_vector
    )
    selected, shortfall, excluded = res["selected"], res["shortfall"], res["excluded"]
    factory = res["index"]["factory"]
    timings.update(res["timings"])
    t0 = time.perf_counter()
    transfer = curation.transfer_table(gallery, selected)
    storage.write_parquet(storage.join(out, "transfer_set.parquet"), transfer)
    timings["select"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = curation.summary(
        gallery,
        sets["queries"][0],
        transfer,
        shortfall,
        excluded,
        cur.images_per_query,
        duplicates=res["duplicates"],
        reasons=res["select"].get("reasons"),
        capped=res["select"].get("capped"),
    )
    reports = write_report(
        out,
        sets["queries"][0],
        transfer,
        summary,
        cur.report_queries,
        curation.origins_of(gallery, transfer),
        {
            "encoder": f"{encoder.name} @ {encoder.img_size}px",
            "crops per image": query_scheme.crops_per_image(),
            "index": f"{factory}, {crops['gallery']} gallery crops, "
            f"nprobe {res['index']['nprobe']}, recall@10 "
            f"{res['index']['recall']} (target {cur.target_recall})",
            "unreadable images skipped": ", ".join(f"{k}: {v}" for k, v in skipped.items()),
        },
    )
    timings["report"] = time.perf_counter() - t0

    elapsed = time.perf_counter() - started
    m = {
        "stage": "curate",
        "name": "",
        "config_hash": h,
        "outputs": {
            "transfer_set": storage.join(out, "transfer_set.parquet"),
            "index": storage.join(out, "index.faiss"),
            "embeddings": storage.join(out, "embeddings"),
            **reports,
        },
        "rows": transfer.num_rows,
        "encoder": encoder.name,
        "img_size": encoder.img_size,
        "embedding_dim": dim,
        "crops_per_image": query_scheme.crops_per_image(),
        "images": {n: len(sets[n][0]) for n in SETS},
        "crops": crops,
        "skipped": sum(skipped.values()),
        "skipped_by_set": skipped,
        "index_type": factory,
        "vectors": crops["gallery"],
        "index": res["index"],
        "dedup_margin": res["dedup_margin"],
        "duplicate_groups": res["duplicate_groups"],
        "shards": n_shards,
        "computed_shards": len(blocks),
        **summary,
        "timings": timings,
        "seconds": elapsed,
        "crops_per_second": (sum(s["rows"] for s in stats) / timings["embed"]) if stats else None,
        "flops_per_crop": fpc,
        "flops": fpc * sum(crops.values()),
        "device_seconds": sum(s["seconds"] for s in stats),
    }
    log.info(
        "curate: %d images for %d queries (%d short), %d near-duplicates excluded, %.0fs",
        transfer.num_rows,
        summary["queries"],
        summary["shortfall"]["queries"],
        summary["excluded"]["images"],
        elapsed,
    )
    return manifest.write(out, m, cfg)


def _read_embeddings(dirs: dict, sets: dict):
    """Query rows, protected vectors, gallery part files and their vectors' image ids."""
    q = storage.read_parquet(dirs["queries"], columns=[C.IMAGE_ID, *C.BOX, C.EMBEDDING])
    p = (
        storage.read_parquet(dirs["protected"], columns=[GALLERY_INDEX, C.EMBEDDING])
        if len(sets["protected"][0])
        else None
    )
    parts = shards.list_parts(dirs["gallery"])
    image_of_vector = np.concatenate(
        [_read_part(f, GALLERY_INDEX)[GALLERY_INDEX].to_numpy() for f in parts]
    ).astype(np.int64)
    crops = {
        "queries": len(q),
        "protected": len(p) if p is not None else 0,
        "gallery": len(image_of_vector),
    }
    readable = {
        "queries": len(set(q[C.IMAGE_ID].to_pylist())),
        "protected": len(np.unique(p[GALLERY_INDEX].to_numpy())) if p is not None else 0,
        "gallery": len(np.unique(image_of_vector)),
    }
    skipped = {n: len(sets[n][0]) - readable[n] for n in SETS}
    for what, name in (("gallery", "gallery"), ("query", "queries")):
        if not crops[name]:
            raise KtrayError(
                f"no readable {what} images: all {len(sets[name][0])} were skipped as unreadable"
            )
    return q, p, parts, image_of_vector, crops, skipped


def _block(table: pa.Table, name: str, shard: int, shard_rows: int) -> pa.Table:
    return shards.shard_block(
        table.select([GALLERY_INDEX, C.IMAGE_ID, C.SOURCE]), name, shard, shard_rows
    )


def _compute(
    cfg: Config,
    encoder: EncoderSpec,
    schemes: dict,
    dirs: dict,
    blocks: list[pa.Table],
    crops_per_image: int,
) -> list[dict]:
    size = encoder.img_size
    return shards.map_shards(
        cfg,
        blocks,
        decode_shard,
        {"schemes": schemes, "size": size},
        EmbedWriter,
        {"encoder": encoder.as_dict(), "out_dirs": dirs, "batch_size": cfg.curate.batch_size},
        block_bytes=cfg.curate.shard_rows * max(1, crops_per_image) * size * size * 3,
        describe=lambda r: (
            f"curate: {r['set']} shard {r['shard']} embedded ({r['rows']} "
            f"crops, {r['skipped']} skipped, {r['seconds']:.1f}s)"
        ),
    )


def _read_part(uri: str, column: str) -> pa.Table:
    fs, path = storage.fs_and_path(uri)
    return pq.read_table(path, columns=[column], filesystem=fs)
