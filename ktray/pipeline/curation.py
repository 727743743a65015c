"""Curation's tables (no ray here): config checks, the gallery, query sets, the transfer set.

The ``curate`` stage (``ktray.stages.curate``) embeds these tables with Ray Data and selects
with :mod:`ktray.retrieval`; this module holds what it needs around that, so the checks that
can fail on bad input run before any Ray work.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ktray import storage
from ktray.config import config_hash
from ktray.data import columns as C
from ktray.data.readers import read_gallery
from ktray.errors import KtrayError
from ktray.pipeline.tasks import prepare_task, transfer_uri
from ktray.retrieval import (
    balanced_select,
    build_reserve_bytes,
    choose_index,
    crop_boxes,
    load_index,
    save_index,
    search,
)
from ktray.retrieval.dedup import first_vectors, gallery_duplicates
from ktray.retrieval.embed import GALLERY_INDEX
from ktray.retrieval.select import best_pairs, scan_near_duplicates
from ktray.retrieval.store import PartStore
from ktray.retrieval.tune import build_measured

log = logging.getLogger("ktray")
ORIGIN = "origin"
IN_DOMAIN, GENERIC, GALLERY = "in_domain", "generic", "gallery"
TRANSFER_SCHEMA = pa.schema(
    [
        (C.IMAGE_ID, pa.string()),
        (C.SOURCE, pa.string()),
        (C.LABEL, pa.int64()),
        (C.QUERY_ID, pa.string()),
        (C.RANK, pa.int32()),
        (C.SCORE, pa.float32()),
    ]
)


def check_config(cfg) -> None:
    """Curation's checks beyond each value's own (those run when ``CurateConfig`` is built):
    the crop settings as a whole, and the encoder with its weights. One-line KtrayError."""
    from ktray.models.available import check_encoder

    cur = cfg.curate
    crop_boxes(cur.random_crops, cur.grid, tuple(float(s) for s in cur.scales), 0, "")
    try:
        if cur.encoder:
            check_encoder(cur.encoder, cur.pretrained)
        else:
            check_encoder(
                cfg.teacher.backbone, cfg.teacher.pretrained and not cfg.teacher.checkpoint
            )
    except KtrayError as e:
        raise KtrayError(
            f"{'curate.encoder' if cur.encoder else 'teacher.backbone'}: {e}"
        ) from None


def check_index(factory: str, dim: int) -> None:
    """A ``curate.index`` factory string that faiss cannot build for ``dim``-d embeddings
    fails here, before any embedding work (one-line KtrayError)."""
    if factory == "auto":
        return
    import faiss

    try:
        faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(e).strip().splitlines()[-1])
        raise KtrayError(
            f"curate.index: faiss cannot build {factory!r} for {dim}-d embeddings: {why}"
        ) from None


def split(info: dict, name: str) -> pa.Table | None:
    """A split of the prepared task (``prepare_task(cfg)``) as an image table, or None."""
    uri = info["outputs"].get(name)
    return storage.read_parquet(uri, columns=[C.IMAGE_ID, C.SOURCE]) if uri else None


def indexed(*tables: pa.Table | None) -> pa.Table:
    """``gallery_index, image_id, source`` rows of the tables, concatenated (index 0..N-1)."""
    parts = [t.select([C.IMAGE_ID, C.SOURCE]) for t in tables if t is not None and len(t)]
    if not parts:
        return pa.table(
            {
                GALLERY_INDEX: pa.array([], pa.int64()),
                C.IMAGE_ID: pa.array([], pa.string()),
                C.SOURCE: pa.array([], pa.string()),
            }
        )
    t = pa.concat_tables(parts)
    return t.add_column(0, GALLERY_INDEX, pa.array(np.arange(len(t), dtype=np.int64)))


def gallery_table(cfg) -> pa.Table:
    """``image_id, source, origin`` of the gallery.

    ``curate.gallery`` empty: the demo gallery, the task's in-domain unlabeled images mixed
    with the generic pool (origins ``in_domain`` / ``generic``; ids are prefixed with the
    origin only when the two sets share ids). Otherwise ``read_gallery(curate.gallery)``
    (origin ``gallery``: unknown).
    """
    uri = cfg.curate.gallery
    if uri:
        t = read_gallery(uri).select([C.IMAGE_ID, C.SOURCE])
        return t.append_column(ORIGIN, pa.array([GALLERY] * len(t), pa.string()))
    info = prepare_task(cfg)
    tables = []
    for origin, key in ((IN_DOMAIN, "unlabeled"), (GENERIC, "generic")):
        if key in info["outputs"]:
            t = storage.read_parquet(transfer_uri(cfg, origin), columns=[C.IMAGE_ID, C.SOURCE])
            tables.append(t.append_column(ORIGIN, pa.array([origin] * len(t), pa.string())))
    if not tables:
        raise KtrayError(
            "curate.gallery is empty and the task has neither unlabeled images "
            "nor a generic pool (data.generic_images) to use as the gallery"
        )
    ids = [i for t in tables for i in t[C.IMAGE_ID].to_pylist()]
    if len(set(ids)) != len(ids):
        tables = [
            t.set_column(
                0,
                C.IMAGE_ID,
                pa.array(
                    [f"{o}/{i}" for o, i in zip(t[ORIGIN].to_pylist(), t[C.IMAGE_ID].to_pylist())],
                    pa.string(),
                ),
            )
            for t in tables
        ]
    return pa.concat_tables(tables)


def transfer_table(gallery: pa.Table, selected: dict) -> pa.Table:
    """The transfer set: the selected gallery images (``balanced_select``'s table, whose
    ``image_id`` are gallery row numbers) as an image table + ``query_id, rank, score``."""
    rows = pa.array(np.asarray(selected[C.IMAGE_ID], dtype=np.int64))
    picked = gallery.take(rows)
    return pa.Table.from_arrays(
        [
            picked[C.IMAGE_ID],
            picked[C.SOURCE],
            pa.array([C.UNLABELED] * len(rows), pa.int64()),
            pa.array([str(q) for q in selected[C.QUERY_ID]], pa.string()),
            pa.array(np.asarray(selected[C.RANK], dtype=np.int32)),
            pa.array(np.asarray(selected[C.SCORE], dtype=np.float32)),
        ],
        schema=TRANSFER_SCHEMA,
    )


def summary(
    gallery: pa.Table,
    queries: pa.Table,
    transfer: pa.Table,
    shortfall: dict,
    excluded: set[int],
    images_per_query: int,
    examples: int = 20,
    duplicates: set[int] | None = None,
    reasons: dict | None = None,
    capped: list | None = None,
) -> dict:
    """The manifest's account of a selection: counts per query, shortfall, exclusions.

    Work is per query and per excluded image; the gallery is only counted (Arrow), never
    turned into Python objects.
    """
    per_query = {q: 0 for q in queries[C.IMAGE_ID].to_pylist()}
    for q in transfer[C.QUERY_ID].to_pylist():
        per_query[q] = per_query.get(q, 0) + 1
    counts: dict[int, int] = {}
    for n in per_query.values():
        counts[n] = counts.get(n, 0) + 1
    # queries whose every crop was unreadable never reached the selection: they are short too
    short = {q: images_per_query - n for q, n in per_query.items() if n < images_per_query}
    short.update({str(q): int(v) for q, v in shortfall.items()})
    why = {str(q): r for q, r in (reasons or {}).items()}
    by_reason: dict[str, int] = {}
    for q in short:
        r = why.get(q, "unreadable query")
        by_reason[r] = by_reason.get(r, 0) + 1
    chosen = origins_of(gallery, transfer)
    known = [o for o in chosen if o != GALLERY]
    vc = pc.value_counts(gallery[ORIGIN]).to_pylist() if len(gallery) else []
    duplicates = duplicates or set()
    return {
        "queries": len(per_query),
        "images_per_query": images_per_query,
        "unique_images": len(set(transfer[C.IMAGE_ID].to_pylist())),
        "per_query_counts": {str(k): v for k, v in sorted(counts.items())},
        "shortfall": {
            "queries": len(short),
            "images": int(sum(short.values())),
            "by_reason": dict(sorted(by_reason.items())),
            "examples": dict(sorted(short.items())[:examples]),
        },
        "capped_queries": len(capped or []),
        "excluded": {"images": len(excluded), "examples": _ids(gallery, excluded, examples)},
        "gallery_duplicates": {
            "images": len(duplicates),
            "examples": _ids(gallery, duplicates, examples),
        },
        "gallery_origins": {
            d["values"]: d["counts"] for d in sorted(vc, key=lambda d: d["values"])
        },
        "in_domain_fraction": (sum(o == IN_DOMAIN for o in known) / len(known))
        if known and len(known) == len(chosen)
        else None,
        "score": _score_stats(transfer[C.SCORE].to_numpy()),
    }


def leak_examples(gallery: pa.Table, protected_ids: list, pairs: list) -> list[dict]:
    """The leak check's examples (``(gallery row, protected row, exact cosine, ...)``) with
    image ids: which gallery image was removed for which protected image."""
    return [
        {
            "gallery_image": gallery[C.IMAGE_ID][int(g)].as_py(),
            "protected_image": str(protected_ids[int(r)]),
            "cosine": float(cos),
        }
        for g, r, cos, *_ in pairs
    ]


def _ids(gallery: pa.Table, rows: set[int], n: int) -> list[str]:
    """The image ids of the first ``n`` gallery rows of ``rows``, sorted."""
    take = pa.array(sorted(rows)[:n], pa.int64())
    return sorted(gallery[C.IMAGE_ID].take(take).to_pylist())


def origins_of(gallery: pa.Table, transfer: pa.Table) -> list[str]:
    """The gallery origin of every transfer-set row (a hash join in Arrow, not Python)."""
    rows = pc.index_in(transfer[C.IMAGE_ID], value_set=gallery[C.IMAGE_ID].combine_chunks())
    return gallery[ORIGIN].take(rows).to_pylist()


def _score_stats(scores: np.ndarray) -> dict | None:
    if not len(scores):
        return None
    q = np.quantile(scores, [0.0, 0.5, 1.0])
    return {
        "min": float(q[0]),
        "median": float(q[1]),
        "max": float(q[2]),
        "mean": float(scores.mean()),
    }


def index_and_select(
    cfg,
    out: str,
    query_vecs: np.ndarray,
    query_ids: list,
    protected_vecs: np.ndarray,
    parts: list[str],
    image_of_vector: np.ndarray,
) -> dict:
    """Gallery index, leak protection, self-dedup and balanced selection in this process.

    The curate stage runs the same two halves in Ray (:func:`build_and_protect` in a task,
    the selection's searches in per-node actors); this in-process composition is what the
    library-level tests and benchmarks run.

    Args:
        cfg: the run's Config (``curate.*``, ``data.seed``).
        out: the curate folder (``index.faiss`` + ``index.json`` are written there).
        query_vecs: ``[Nq, D]`` query crop embeddings; ``query_ids`` their query image ids.
        protected_vecs: ``[P, D]`` embeddings that must not leak (labeled, val, test).
        parts: the gallery's embedding part files, in vector-id order.
        image_of_vector: ``[V]`` gallery row of every gallery vector.

    Returns:
        :func:`build_and_protect`'s dict plus ``selected`` and ``shortfall`` (as
        :func:`balanced_select`) and ``select`` (capped queries, reasons, depth).
    """
    res = build_and_protect(cfg, out, query_vecs, protected_vecs, parts, image_of_vector)
    index = load_index(res["index_uri"])
    t0 = time.perf_counter()
    res.update(
        select(
            cfg,
            lambda v, k: search(index, v, k),
            query_vecs,
            query_ids,
            image_of_vector,
            res["excluded"] | res["duplicates"],
        )
    )
    res["timings"]["select"] = time.perf_counter() - t0
    return res


def choose_factory(cfg, n_vectors: int, dim: int, part_rows: int) -> str:
    """``curate.index``, or for ``auto`` :func:`choose_index` within ``curate.memory_budget_gb``
    with the build's training sample and part buffers taken off the budget."""
    cur = cfg.curate
    if cur.index != "auto":
        return cur.index
    budget = int(cur.memory_budget_gb * 2**30)
    reserve = build_reserve_bytes(n_vectors, dim, part_rows)
    try:
        return choose_index(n_vectors, dim, budget, reserve_bytes=reserve)
    except KtrayError:
        return choose_index(n_vectors, dim, budget)  # the index alone may still fit


def build_and_protect(
    cfg,
    out: str,
    query_vecs: np.ndarray,
    protected_vecs: np.ndarray | None,
    parts: list[str],
    image_of_vector: np.ndarray,
) -> dict:
    """Build (or reuse) the gallery index, then find what must never be selected.

    ``protected_vecs`` (labeled, val, test embeddings) are checked exactly against every
    gallery vector here (:func:`scan_near_duplicates`); None skips that (the curate stage
    runs the scan in parallel Ray tasks beside this build).

    Runs where the index fits (the curate stage: a Ray task with ``curate.index_cpus`` /
    ``curate.index_memory_gb``); memory is the index, a training sample and one part.

    Returns:
        ``index`` (the :class:`IndexReport` dict + ``memory``: peak RSS of this process and
        the index size against ``curate.memory_budget_gb``), ``index_uri``, ``excluded``
        (gallery rows with a crop above ``curate.dedup_threshold`` exact cosine to a
        labeled/val/test image), ``leak_check`` (:func:`leak_summary`), ``duplicates`` and
        ``duplicate_groups`` (gallery self-dedup), ``dedup_margin`` and ``timings``.
    """
    cur = cfg.curate
    timings = {}
    t0 = time.perf_counter()
    store = PartStore(parts)
    dim = query_vecs.shape[1]
    factory = choose_factory(cfg, len(store), dim, int(store.counts.max(initial=0)))
    index, report = _gallery_index(
        out, store, factory, query_vecs, cfg.data.seed, cur.target_recall
    )
    if not report["reached"] and "Refine" not in factory and "PQ" in factory:
        # PQ alone plateaus below the target whatever nprobe; SQ8 re-ranking needs ~dim
        # more bytes per vector (README: recall@10 0.54 -> 0.96 at 1M x 256).
        need = 1.05 * len(store) * (dim + dim // 4 + 8) / 2**30  # SQ8 + PQ(dim/4) + ids
        need += build_reserve_bytes(len(store), dim, int(store.counts.max(initial=0))) / 2**30
        log.warning(
            "curate: %s reaches recall@10 %.3f < curate.target_recall %.2f; "
            "curate.memory_budget_gb=%.0f would allow SQ8 re-ranking",
            factory,
            report["recall"],
            cur.target_recall,
            math.ceil(need),
        )
    timings["index"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    margin = cur.dedup_margin + float(report.get("score_error") or 0.0)
    excluded, leak = set(), None
    if protected_vecs is not None:
        # Leak protection, exact: every gallery vector against every protected vector (one
        # more read of the parts; the curate stage spreads it over Ray tasks instead).
        parts_iter = ((int(store.offsets[p]), vec) for p, vec in enumerate(store))
        pairs, cos = scan_near_duplicates(parts_iter, protected_vecs, cur.dedup_threshold)
        excluded, leak = leak_summary(cfg, pairs, cos, image_of_vector, len(store))
    duplicates, groups = set(), 0
    if cur.dedup_gallery:
        first = np.zeros(len(image_of_vector), dtype=bool)
        first[first_vectors(image_of_vector)] = True

        def full_images():
            for p, vec in enumerate(store):
                ids = np.arange(store.offsets[p], store.offsets[p + 1])
                yield ids[first[ids]], vec[first[ids]]

        duplicates, groups = gallery_duplicates(
            index, full_images(), store.take, image_of_vector, cur.dedup_threshold, margin
        )
        # (gallery self-dedup uses the selection's nprobe: it is optional and gallery-wide)
        duplicates -= excluded
    timings["dedup"] = time.perf_counter() - t0
    uri = storage.join(out, "index.faiss")
    report = dict(report)
    report["memory"] = {
        "budget_gb": cur.memory_budget_gb,
        "index_gib": round(_index_bytes(uri) / 2**30, 4),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
    }
    report["memory"]["within_budget"] = (
        report["memory"]["peak_rss_gib"] <= cur.memory_budget_gb * 1.0
    )
    return {
        "excluded": excluded,
        "leak_check": leak,
        "duplicates": duplicates,
        "duplicate_groups": groups,
        "index": report,
        "index_uri": uri,
        "dedup_margin": margin,
        "timings": timings,
    }


LEAK_EXAMPLES = 20


def leak_summary(cfg, pairs, cos, image_of_vector, vectors: int) -> tuple[set[int], dict]:
    """The exact leak check's result: gallery images to exclude, and the manifest's
    ``leak_check`` (pairs found, images removed, the best pairs as examples)."""
    iov = np.asarray(image_of_vector, dtype=np.int64)
    excluded = {int(i) for i in np.unique(iov[pairs[:, 1]])} if len(pairs) else set()
    return excluded, {
        "method": "exact scan",
        "threshold": cfg.curate.dedup_threshold,
        "gallery_vectors": int(vectors),
        "pairs_above_threshold": int(len(pairs)),
        "images": len(excluded),
        "pairs": best_pairs(pairs, cos, iov)[:LEAK_EXAMPLES],
    }


def select(
    cfg,
    search_fn,
    query_vecs: np.ndarray,
    query_ids: list,
    image_of_vector: np.ndarray,
    exclude: set[int],
) -> dict:
    """Balanced selection over ``search_fn`` (in-process index or Ray search actors)."""
    cur = cfg.curate
    crops = len(query_vecs) // max(1, len(set(query_ids)))
    max_k = cur.max_k or len(image_of_vector)
    k0 = cur.k0 or max(64, 2 * cur.images_per_query * crops)
    sel_report: dict = {}
    selected, shortfall = balanced_select(
        search_fn,
        query_vecs,
        query_ids,
        image_of_vector,
        cur.images_per_query,
        k0=min(k0, max_k),
        max_k=max_k,
        seed=cfg.data.seed,
        exclude_images=np.fromiter(exclude, np.int64, len(exclude)),
        report=sel_report,
    )
    return {"selected": selected, "shortfall": shortfall, "select": sel_report}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux ``ru_maxrss`` is in KiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _index_bytes(uri: str) -> int:
    fs, path = storage.fs_and_path(uri)
    return int(fs.info(path).get("size") or 0)


def _gallery_index(
    out: str, store: PartStore, factory: str, probes: np.ndarray, seed: int, target_recall: float
):
    """Build (or reuse) ``out/index.faiss``; ``index.json`` holds its key and report."""
    uri, meta_uri = storage.join(out, "index.faiss"), storage.join(out, "index.json")
    fs = storage.fs_and_path(store.parts[0])[0] if store.parts else None
    sizes = [fs.info(storage.fs_and_path(f)[1]).get("size") for f in store.parts]
    key = config_hash(
        [os.path.basename(f) for f in store.parts], sizes, factory, target_recall, seed
    )
    if storage.exists(uri) and storage.exists(meta_uri):
        meta = storage.read_json(meta_uri)
        if meta.get("key") == key:
            log.info("curate: reusing %s", uri)
            return load_index(uri), meta["report"]
    index, report = build_measured(factory, store, probes, seed, target_recall)
    save_index(index, uri)
    storage.write_json(
        meta_uri,
        {"key": key, "factory": factory, "vectors": int(index.ntotal), "report": report.as_dict()},
    )
    return index, report.as_dict()
