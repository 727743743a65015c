"""``ktray curate``: a transfer set curated from a gallery by query-balanced crop retrieval.

Queries are the task's labeled train images; protected images (labeled train, val and test) must
never leak into the transfer set, so gallery images that nearly duplicate them are excluded.
Segmentation tasks curate the same way (their masks play no part in retrieval;
:func:`ktray.pipeline.curation.image_sets`). Three image sets are embedded as crops
(:mod:`ktray.retrieval.embed`): ``queries`` (train), ``protected`` (val + test; the full image
unless ``curate.protect_crops``) and ``gallery`` (ordered by file and row, so its reads are
sequential). Each set is cut into shards of ``curate.shard_rows`` images; every shard is one Ray
Data block: a CPU stage decodes it and cuts its crops to ``uint8`` arrays, and an actor pool of
``EmbedWriter`` (``infer.*``) embeds them and writes
``OUT/curate/embeddings/<set>/part-NNNNN.parquet`` atomically (:mod:`ktray.stages.shards`). A rerun
(or a resumed killed job) computes only the missing shards; a ``spec.json`` per set drops part files
made under other settings (:mod:`ktray.stages.curate_embed`). Then the FAISS index over the gallery
crops is built in one Ray task (trained on a sample, filled part by part, recall measured;
``curate.index_cpus`` / ``index_memory_gb``) while Ray tasks over groups of parts compare every
gallery crop exactly with the protected embeddings (the leak check); balanced selection searches
query batches in ``SearchActor`` s that load the index once per node
(:mod:`ktray.stages.curate_search`); then ``OUT/curate/transfer_set.parquet`` + report files +
``manifest.json`` (last).
"""

from __future__ import annotations

import logging
import time

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.pipeline import curation, curation_index, curation_summary, manifest
from ktray.pipeline.curation_report import write_report
from ktray.pipeline.tasks import prepare_task
from ktray.predict import order_for_reading
from ktray.retrieval.embed import CropScheme, encoder_facts, encoder_from_config, vectors
from ktray.stages.curate_embed import SETS, embed_sets, protected_embeddings, read_embeddings
from ktray.stages.curate_search import SearchPool, build_and_scan

log = logging.getLogger("ktray")


def curate_dir(cfg: Config) -> str:
    return manifest.stage_dir(cfg.out, "curate")


def run(cfg: Config) -> dict:
    """Curate (or reuse) ``OUT/curate/transfer_set.parquet``; returns the manifest."""
    cur = cfg.curate
    out = curate_dir(cfg)
    encoder = encoder_from_config(cfg)
    # Its inputs: the labeled queries (the prepared task, whose hash covers the listing of
    # data.root) and the gallery's files (an empty gallery = the demo's, made from the task).
    info = prepare_task(cfg)
    gallery_files = storage.fingerprint(cur.gallery) if cur.gallery else ""
    h = config_hash(cfg.curate, cfg.data, encoder.as_dict(), info["config_hash"], gallery_files)
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("curate: reusing the finished run in %s", out)
        return done
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # Everything that can fail on bad input fails here, before Ray work starts.
    curation.check_config(cfg)
    gallery = curation.gallery_table(cfg)
    query_scheme = CropScheme(cur.random_crops, cur.grid, tuple(cur.scales), cfg.data.seed)
    queries, protected = curation.image_sets(info)  # train; val + test (both task types)
    sets = {
        "queries": (queries, query_scheme),
        "protected": (
            protected,
            query_scheme if cur.protect_crops else CropScheme(full_only=True),
        ),
        "gallery": (order_for_reading(curation.indexed(gallery)), query_scheme),
    }
    fpc, enc_dim = encoder_facts(encoder)  # also builds the encoder once: a bad name fails here
    curation.check_index(cur.index, enc_dim)
    timings["prepare"] = time.perf_counter() - started

    t0 = time.perf_counter()
    files = {"queries": info["config_hash"], "protected": info["config_hash"]}
    files["gallery"] = gallery_files or info["config_hash"]
    dirs, stats, n_shards, computed = embed_sets(cfg, encoder, sets, out, files)
    timings["embed"] = time.perf_counter() - t0

    q, p, parts, image_of_vector, crops, skipped = read_embeddings(dirs, sets)
    query_vecs = vectors(q)
    dim = query_vecs.shape[1]
    protected_vecs, protected_ids = protected_embeddings(
        q, query_vecs, p, sets["protected"][0], cur.protect_crops
    )
    # Index (recall measured), exact leak protection and gallery self-dedup in one Ray task
    # placed by its resources; then balanced selection searching in per-node actors.
    res = build_and_scan(cfg, out, query_vecs, protected_vecs, parts, image_of_vector)
    t0 = time.perf_counter()
    idx = res["index"]
    with SearchPool(cfg, res["index_uri"], idx.get("nprobe"), idx.get("k_factor")) as pool:
        res.update(
            curation_index.select(
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
    leak = dict(leak, pairs=curation_summary.leak_examples(gallery, protected_ids, leak["pairs"]))
    summary = curation_summary.summary(
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
            f"nprobe {res['index']['nprobe']}, re-ranking k_factor "
            f"{res['index'].get('k_factor')}, recall@10 "
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
        "computed_shards": computed,
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
