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
missing shards; a ``spec.json`` per set drops part files made under other settings. Then the
FAISS index over the gallery crops is built in one Ray task (trained on a sample, filled part
by part, recall measured; ``curate.index_cpus`` / ``index_memory_gb``) while Ray tasks over
groups of parts compare every gallery crop exactly with the protected embeddings (the leak
check); balanced selection searches query batches in :class:`SearchActor` s that load the
index once per node; then ``OUT/curate/transfer_set.parquet`` + report files +
``manifest.json`` (last).
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
    EMBEDDING_DTYPE,
    GALLERY_INDEX,
    CropScheme,
    Embedder,
    EncoderSpec,
    decode_crops,
    encoder_facts,
    encoder_from_config,
    vectors,
)
from ktray.retrieval.index import load_index, search, set_nprobe
from ktray.retrieval.select import scan_near_duplicates
from ktray.retrieval.store import PartStore
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
    fpc, enc_dim = encoder_facts(encoder)  # also builds the encoder once: a bad name fails here
    curation.check_index(cur.index, enc_dim)
    timings["prepare"] = time.perf_counter() - started

    t0 = time.perf_counter()
    dirs = {name: storage.join(out, "embeddings", name) for name in SETS}
    blocks, n_shards = [], {}
    for name, (table, scheme) in sets.items():
        spec = {
            "encoder": encoder.as_dict(),
            "scheme": scheme.as_dict(),
            "shard_rows": cur.shard_rows,
            "dtype": EMBEDDING_DTYPE,
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
    qids = np.asarray(q[C.IMAGE_ID].to_pylist(), dtype=object)
    protected_ids = list(qids if cur.protect_crops else qids[full])
    if p is not None:
        protected_vecs = np.concatenate([protected_vecs, vectors(p)])
        pid = sets["protected"][0][C.IMAGE_ID].take(p[GALLERY_INDEX].combine_chunks())
        protected_ids += pid.to_pylist()
    # Index (recall measured), exact leak protection and gallery self-dedup in one Ray task
    # placed by its resources; then balanced selection searching in per-node actors.
    res = _build_and_scan(cfg, out, query_vecs, protected_vecs, parts, image_of_vector)
    t0 = time.perf_counter()
    with SearchPool(cfg, res["index_uri"], res["index"].get("nprobe")) as pool:
        res.update(
            curation.select(
                cfg,
                pool.search,
                query_vecs,
                q[C.IMAGE_ID].to_pylist(),
                image_of_vector,
                res["excluded"] | res["duplicates"],
            )
        )
        res["select"]["search_actors"] = len(pool.actors)
    res["timings"]["select"] = time.perf_counter() - t0
    selected, shortfall, excluded = res["selected"], res["shortfall"], res["excluded"]
    factory = res["index"]["factory"]
    timings.update(res["timings"])
    t0 = time.perf_counter()
    transfer = curation.transfer_table(gallery, selected)
    storage.write_parquet(storage.join(out, "transfer_set.parquet"), transfer)
    timings["select"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    mem, leak = res["index"]["memory"], res["leak_check"]
    leak = dict(leak, pairs=curation.leak_examples(gallery, protected_ids, leak["pairs"]))
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
            "index build memory": f"peak RSS {mem['peak_rss_gib']} GiB, index "
            f"{mem['index_gib']} GiB (curate.memory_budget_gb {mem['budget_gb']})",
            "leak check": f"exact scan of {leak['gallery_vectors']} gallery crops against "
            f"{len(protected_ids)} labeled/val/test embeddings: "
            f"{leak['pairs_above_threshold']} pairs above {leak['threshold']}, "
            f"{leak['images']} gallery images removed",
            "unreadable images skipped": ", ".join(f"{k}: {v}" for k, v in skipped.items()),
        },
        leaks=leak["pairs"],
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
        "leak_check": leak,
        "search_actors": res["select"].get("search_actors"),
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


def _build_and_scan(cfg: Config, out: str, query_vecs, protected_vecs, parts, image_of_vector):
    """The index build (:func:`curation.build_and_protect`) as one Ray task, and beside it
    the exact leak check (:func:`scan_near_duplicates`) as Ray tasks over groups of parts.

    The build task asks for ``curate.index_cpus`` CPUs and ``curate.index_memory_gb``
    (default ``memory_budget_gb``) of Ray ``memory``, so it lands on a node with that much
    free; it runs in a fresh worker process (``max_calls=1``), so the peak RSS it reports is
    the build's own. Gallery self-duplicates that are also leaks are counted as leaks."""
    import ray

    cur = cfg.curate
    t0 = time.perf_counter()
    task = ray.remote(max_calls=1)(_build_in_worker).options(
        num_cpus=cur.index_cpus,
        memory=int((cur.index_memory_gb or cur.memory_budget_gb) * 2**30),
        max_retries=0,
    )
    threads = max(1, int(cur.index_cpus))
    build = task.remote(cfg, out, query_vecs, None, parts, image_of_vector, threads)
    offsets = PartStore(parts).offsets
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = np.array_split(np.arange(len(parts)), min(len(parts), 2 * cpus))
    protected_ref = ray.put(np.ascontiguousarray(protected_vecs, np.float32))
    scan = ray.remote(num_cpus=1)(_scan_parts)
    scans = [
        scan.remote(
            [parts[i] for i in g], [int(offsets[i]) for i in g], protected_ref, cur.dedup_threshold
        )
        for g in groups
        if len(g)
    ]
    found = ray.get(scans)
    pairs = np.concatenate([f[0] for f in found]) if found else np.zeros((0, 2), np.int64)
    cos = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.float32)
    excluded, leak = curation.leak_summary(cfg, pairs, cos, image_of_vector, len(image_of_vector))
    leak["scan_tasks"] = len(scans)
    leak_seconds = time.perf_counter() - t0
    res = ray.get(build)
    res["excluded"], res["leak_check"] = excluded, leak
    res["duplicates"] = res["duplicates"] - excluded
    res["timings"]["leak_scan"] = leak_seconds
    return res


def _scan_parts(parts: list[str], offsets: list[int], protected: np.ndarray, threshold: float):
    """A leak-scan task: its parts read one at a time, each compared exactly."""
    store = PartStore(parts)
    return scan_near_duplicates(
        ((off, store.read(i)) for i, off in enumerate(offsets)), protected, threshold
    )


def _build_in_worker(cfg, out, query_vecs, protected_vecs, parts, image_of_vector, threads):
    import faiss

    faiss.omp_set_num_threads(threads)
    return curation.build_and_protect(cfg, out, query_vecs, protected_vecs, parts, image_of_vector)


class SearchActor:
    """Holds the gallery index once and answers top-k searches of query crop batches."""

    def __init__(self, index_uri: str, nprobe: int | None, threads: int):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.index = load_index(index_uri)
        if nprobe:
            set_nprobe(self.index, nprobe)

    def search(self, vectors: np.ndarray, k: int):
        return search(self.index, vectors, k)


class SearchPool:
    """``curate.search_actors`` :class:`SearchActor` (default: one per alive node, pinned
    to it, with ``curate.search_cpus`` CPUs each, default all of that node's); a search call
    splits its queries over them and concatenates the answers in order."""

    MIN_CHUNK = 256

    def __init__(self, cfg: Config, index_uri: str, nprobe: int | None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cur = cfg.curate
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        actor = ray.remote(SearchActor)
        self.actors = []
        if cur.search_actors:
            cpus = cur.search_cpus or 1.0
            for _ in range(cur.search_actors):
                opts = {"num_cpus": cpus, "scheduling_strategy": "SPREAD"}
                self.actors.append(
                    actor.options(**opts).remote(index_uri, nprobe, max(1, int(cpus)))
                )
        else:
            for n in nodes:
                cpus = cur.search_cpus or float(n["Resources"]["CPU"])
                strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                self.actors.append(
                    actor.options(num_cpus=cpus, scheduling_strategy=strategy).remote(
                        index_uri, nprobe, max(1, int(cpus))
                    )
                )
        self._ray = ray

    def search(self, vectors: np.ndarray, k: int):
        n = len(vectors)
        chunk = max(self.MIN_CHUNK, -(-n // len(self.actors)))
        refs = [
            self.actors[i % len(self.actors)].search.remote(vectors[start : start + chunk], k)
            for i, start in enumerate(range(0, n, chunk))
        ]
        parts = self._ray.get(refs)
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


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
