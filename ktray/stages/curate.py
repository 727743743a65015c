"""``ktray curate``: a transfer set curated from a gallery by query-balanced crop retrieval.

Queries are the task's labeled train images; protected images (labeled train, val and test)
must never leak into the transfer set, so gallery images that nearly duplicate them are
excluded. Three image sets are embedded as crops (:mod:`ktray.retrieval.embed`): ``queries``
(train), ``protected`` (val + test; the full image unless ``curate.protect_crops``) and
``gallery``. Each set is cut into shards of ``curate.shard_rows`` images; every shard is one
Ray Data block, and an actor pool of :class:`EmbedWriter` embeds a whole shard and writes
``OUT/curate/embeddings/<set>/part-NNNNN.parquet`` atomically. A rerun (or a resumed killed
job) skips the shards whose part file exists; a ``spec.json`` per set drops part files made
under other settings. Then a FAISS index over the gallery crops (trained on a sample, filled
part by part), near-duplicate removal, balanced selection, and
``OUT/curate/transfer_set.parquet`` + report files + ``manifest.json`` (last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import storage
from ktray.pipeline import curation, manifest
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.errors import KtrayError
from ktray.retrieval import (balanced_select, build_index, choose_index, load_index,
                             remove_near_duplicates, save_index, search, training_size)
from ktray.retrieval.embed import (GALLERY_INDEX, CropScheme, Embedder, EncoderSpec,
                                   encoder_from_config, flops_per_crop, vectors)
from ktray.pipeline.curation_report import write_report
from ktray.stages.common import map_shards
from ktray.pipeline.tasks import prepare_task

log = logging.getLogger("ktray")
SETS = ("queries", "protected", "gallery")


def curate_dir(cfg: Config) -> str:
    return manifest.stage_dir(cfg.out, "curate")


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class EmbedWriter:
    """Ray Data actor: embeds the crops of one shard (block) and writes its part file."""

    def __init__(self, encoder: dict, schemes: dict, out_dirs: dict, batch_size: int,
                 threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.embedder = Embedder(EncoderSpec(**encoder), batch_size=batch_size)
        self.schemes = {k: CropScheme(**dict(v, scales=tuple(v["scales"])))
                        for k, v in schemes.items()}
        self.out_dirs = out_dirs

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = sorted(set(zip(batch["set"].to_pylist(), batch["shard"].to_pylist())))
        stats: dict[str, list] = {k: [] for k in ("set", "shard", "rows", "skipped", "seconds")}
        for name, shard in keys:
            start = time.perf_counter()
            mask = pa.compute.and_(pa.compute.equal(batch["set"], name),
                                   pa.compute.equal(batch["shard"], shard))
            part = batch.filter(mask)
            expected = part["shard_size"][0].as_py()
            if len(part) != expected:  # a shard split across batches would be written partially
                raise RuntimeError(f"{name} shard {shard}: got {len(part)} of {expected} rows")
            table, skipped = self.embedder.embed_rows(part, self.schemes[name])
            storage.write_parquet(storage.join(self.out_dirs[name], part_name(shard)), table)
            for k, v in zip(stats, (name, shard, len(table), skipped,
                                    time.perf_counter() - start)):
                stats[k].append(v)
        return pa.table(stats)


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
        "protected": (curation.indexed(curation.split(info, "val"), curation.split(info, "test")),
                      query_scheme if cur.protect_crops else CropScheme(full_only=True)),
        "gallery": (curation.indexed(gallery), query_scheme),
    }
    if not len(sets["queries"][0]):
        raise KtrayError("curate needs labeled train images as queries; there are none")
    fpc = flops_per_crop(encoder)  # also builds the encoder once: a bad name fails here
    timings["prepare"] = time.perf_counter() - started

    t0 = time.perf_counter()
    dirs = {name: storage.join(out, "embeddings", name) for name in SETS}
    blocks, n_shards = [], {}
    for name, (table, scheme) in sets.items():
        spec = {"encoder": encoder.as_dict(), "scheme": scheme.as_dict(),
                "shard_rows": cur.shard_rows, "images": _fingerprint(table)}
        pending, n_shards[name] = _prepare_dir(dirs[name], spec, len(table), cur.shard_rows)
        blocks += [_block(table, name, s, cur.shard_rows) for s in pending]
    log.info("curate: %d queries, %d protected, %d gallery images; %d shards to embed",
             *(len(sets[n][0]) for n in SETS), len(blocks))
    stats = _compute(cfg, encoder, {n: s.as_dict() for n, (_, s) in sets.items()}, dirs,
                     blocks) if blocks else []
    timings["embed"] = time.perf_counter() - t0

    q, p, parts, image_of_vector, crops, skipped = _read_embeddings(dirs, sets)
    t0 = time.perf_counter()
    query_vecs = vectors(q)
    dim = query_vecs.shape[1]
    factory = choose_index(crops["gallery"], dim, int(cur.memory_budget_gb * 2**30))
    index = _index(out, parts, factory, dim, crops["gallery"], cfg.data.seed,
                   config_hash(_fingerprint_parts(parts), factory))
    timings["index"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = np.array([b == (0.0, 0.0, 1.0, 1.0) for b in zip(*(q[k].to_pylist() for k in C.BOX))])
    protected_vecs = query_vecs if cur.protect_crops else query_vecs[full]
    if p is not None:
        protected_vecs = np.concatenate([protected_vecs, vectors(p)])
    excluded = remove_near_duplicates(index, protected_vecs, image_of_vector,
                                      cur.dedup_threshold)
    timings["dedup"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    k0 = cur.k0 or max(64, 2 * cur.images_per_query * query_scheme.crops_per_image())
    selected, shortfall = balanced_select(
        lambda v, k: search(index, v, k), query_vecs, q[C.IMAGE_ID].to_pylist(),
        image_of_vector, cur.images_per_query, k0=min(k0, cur.max_k), max_k=cur.max_k,
        seed=cfg.data.seed, exclude_images=excluded)
    transfer = curation.transfer_table(gallery, selected)
    storage.write_parquet(storage.join(out, "transfer_set.parquet"), transfer)
    timings["select"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = curation.summary(gallery, sets["queries"][0], transfer, shortfall, excluded,
                               cur.images_per_query)
    reports = write_report(out, sets["queries"][0], transfer, summary, cur.report_queries,
                           curation.origins_of(gallery, transfer),
                           {"encoder": f"{encoder.name} @ {encoder.img_size}px",
                            "crops per image": query_scheme.crops_per_image(),
                            "index": f"{factory}, {crops['gallery']} gallery crops",
                            "unreadable images skipped": ", ".join(
                                f"{k}: {v}" for k, v in skipped.items())})
    timings["report"] = time.perf_counter() - t0

    elapsed = time.perf_counter() - started
    m = {
        "stage": "curate", "name": "", "config_hash": h,
        "outputs": {"transfer_set": storage.join(out, "transfer_set.parquet"),
                    "index": storage.join(out, "index.faiss"), "embeddings": storage.join(out, "embeddings"),
                    **reports},
        "rows": transfer.num_rows, "encoder": encoder.name, "img_size": encoder.img_size,
        "embedding_dim": dim, "crops_per_image": query_scheme.crops_per_image(),
        "images": {n: len(sets[n][0]) for n in SETS}, "crops": crops,
        "skipped": sum(skipped.values()), "skipped_by_set": skipped,
        "index_type": factory, "vectors": crops["gallery"],
        "shards": n_shards, "computed_shards": len(blocks),
        **summary,
        "timings": timings, "seconds": elapsed,
        "crops_per_second": (sum(s["rows"] for s in stats) / timings["embed"]) if stats else None,
        "flops_per_crop": fpc, "flops": fpc * sum(crops.values()),
        "device_seconds": sum(s["seconds"] for s in stats),
    }
    log.info("curate: %d images for %d queries (%d short), %d near-duplicates excluded, "
             "%.0fs", transfer.num_rows, summary["queries"], summary["shortfall"]["queries"],
             summary["excluded"]["images"], elapsed)
    return manifest.write(out, m, cfg)


def _read_embeddings(dirs: dict, sets: dict):
    """Query rows, protected vectors, gallery part files and their vectors' image ids."""
    q = storage.read_parquet(dirs["queries"], columns=[C.IMAGE_ID, *C.BOX, C.EMBEDDING])
    p = storage.read_parquet(dirs["protected"], columns=[GALLERY_INDEX, C.EMBEDDING]) \
        if len(sets["protected"][0]) else None
    parts = _parts(dirs["gallery"])
    image_of_vector = np.concatenate(
        [_read_part(f, GALLERY_INDEX)[GALLERY_INDEX].to_numpy() for f in parts]).astype(np.int64)
    crops = {"queries": len(q), "protected": len(p) if p is not None else 0,
             "gallery": len(image_of_vector)}
    readable = {"queries": len(set(q[C.IMAGE_ID].to_pylist())),
                "protected": len(np.unique(p[GALLERY_INDEX].to_numpy())) if p is not None else 0,
                "gallery": len(np.unique(image_of_vector))}
    skipped = {n: len(sets[n][0]) - readable[n] for n in SETS}
    for what, name in (("gallery", "gallery"), ("query", "queries")):
        if not crops[name]:
            raise KtrayError(f"no readable {what} images: all {len(sets[name][0])} were "
                             "skipped as unreadable")
    return q, p, parts, image_of_vector, crops, skipped


def _fingerprint(table: pa.Table) -> str:
    """A hash of a set's ``(image_id, source)`` rows: its part files are valid for it only."""
    digest = hashlib.sha256()
    for col in (C.IMAGE_ID, C.SOURCE):
        for chunk in table[col].chunks:
            digest.update(b"\0".join(s.encode() for s in chunk.to_pylist()))
            digest.update(b"\1")
    return digest.hexdigest()[:16]


def _fingerprint_parts(parts: list[str]) -> list:
    fs = storage.fs_and_path(parts[0])[0] if parts else None
    return [(os.path.basename(f), fs.info(storage.fs_and_path(f)[1]).get("size")) for f in parts]


def _parts(directory: str) -> list[str]:
    fs, path = storage.fs_and_path(directory)
    if not fs.exists(path):
        return []
    names = sorted(os.path.basename(p) for p in fs.ls(path, detail=False))
    return [storage.join(directory, n) for n in names if n.startswith("part-") and
            n.endswith(".parquet")]


def _prepare_dir(directory: str, spec: dict, n_images: int, shard_rows: int):
    """Drop part files written under another spec; return (pending shards, shard count)."""
    spec = json.loads(json.dumps(spec))  # as read back from spec.json (tuples -> lists)
    spec_uri = storage.join(directory, "spec.json")
    old = storage.read_json(spec_uri) if storage.exists(spec_uri) else None
    existing = _parts(directory)
    if old != spec and (old is not None or existing):
        log.info("curate: %s was embedded under other settings; recomputing it", directory)
        fs = storage.fs_and_path(directory)[0]
        for f in existing:
            fs.rm(storage.fs_and_path(f)[1])
        existing = []
    storage.makedirs(directory)
    if old != spec:
        storage.write_json(spec_uri, spec)
    n = math.ceil(n_images / shard_rows)
    have = {os.path.basename(f) for f in existing}
    return [s for s in range(n) if part_name(s) not in have], n


def _block(table: pa.Table, name: str, shard: int, shard_rows: int) -> pa.Table:
    part = table.slice(shard * shard_rows, shard_rows)
    n = len(part)
    return pa.table({"set": pa.array([name] * n, pa.string()),
                     GALLERY_INDEX: part[GALLERY_INDEX], C.IMAGE_ID: part[C.IMAGE_ID],
                     C.SOURCE: part[C.SOURCE], "shard": pa.array([shard] * n, pa.int32()),
                     "shard_size": pa.array([n] * n, pa.int32())})


def _compute(cfg: Config, encoder: EncoderSpec, schemes: dict, dirs: dict,
             blocks: list[pa.Table]) -> list[dict]:
    return map_shards(
        cfg, EmbedWriter, {"encoder": encoder.as_dict(), "schemes": schemes, "out_dirs": dirs,
                           "batch_size": cfg.curate.batch_size}, blocks,
        lambda r: f"curate: {r['set']} shard {r['shard']} embedded ({r['rows']} crops, "
                  f"{r['skipped']} skipped, {r['seconds']:.1f}s)")


def _index(out: str, parts: list[str], factory: str, dim: int, n: int, seed: int, key: str):
    """Build (or reuse) the gallery index ``index.faiss``; vector ids follow part order."""
    uri, meta_uri = storage.join(out, "index.faiss"), storage.join(out, "index.json")
    if storage.exists(uri) and storage.exists(meta_uri) and storage.read_json(meta_uri).get("key") == key:
        log.info("curate: reusing %s", uri)
        return load_index(uri)
    size = training_size(factory, n)
    sample = _sample(parts, n, size, seed) if size else None

    def shards():
        for f in parts:
            yield vectors(_read_part(f, C.EMBEDDING))

    index = build_index(factory, dim, sample, shards())
    save_index(index, uri)
    storage.write_json(meta_uri, {"key": key, "factory": factory, "vectors": int(index.ntotal)})
    return index


def _sample(parts: list[str], n: int, size: int, seed: int) -> np.ndarray:
    """``size`` gallery vectors drawn uniformly, reading one part file at a time."""
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out, offset = [], 0
    for f in parts:
        fs, path = storage.fs_and_path(f)
        count = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
        want = rows[(rows >= offset) & (rows < offset + count)] - offset
        if len(want):
            out.append(vectors(_read_part(f, C.EMBEDDING).take(pa.array(want))))
        offset += count
    return np.concatenate(out)


def _read_part(uri: str, column: str) -> pa.Table:
    fs, path = storage.fs_and_path(uri)
    return pq.read_table(path, columns=[column], filesystem=fs)
