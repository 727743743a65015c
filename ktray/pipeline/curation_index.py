"""Curation's gallery index and selection (no ray here): build or reuse the FAISS index within
``curate.memory_budget_gb``, the exact leak check against labeled/val/test embeddings, gallery
self-dedup, and the query-balanced selection.

The curate stage runs the two halves in Ray (:func:`build_and_protect` in a task, the
selection's searches in per-node actors); :func:`index_and_select` composes them in-process.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from ktray import storage
from ktray.config import config_hash
from ktray.errors import KtrayError
from ktray.retrieval import (
    balanced_select,
    build_reserve_bytes,
    choose_index,
    load_index,
    save_index,
    search,
)
from ktray.retrieval import index as index_mod
from ktray.retrieval.dedup import first_vectors, gallery_duplicates
from ktray.retrieval.near_duplicates import best_pairs, scan_near_duplicates
from ktray.retrieval.select import id_map
from ktray.retrieval.store import PartStore
from ktray.retrieval.tune import build_measured

log = logging.getLogger("ktray")


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
    iov = id_map(image_of_vector)
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
    infos = [fs.info(storage.fs_and_path(f)[1]) for f in store.parts]
    key = config_hash(
        [os.path.basename(f) for f in store.parts],
        [(i.get("size"), storage.stamp(i)) for i in infos],  # a part rewritten: rebuilt
        factory,
        target_recall,
        seed,
        index_mod.INDEX_RECIPE,  # read at call time: a new build recipe rebuilds
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
