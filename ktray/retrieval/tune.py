"""A gallery index built in one pass over stored parts, with its recall measured.

:func:`build_measured` trains the index on a sample drawn from a random subset of parts
(:meth:`PartStore.sample`), then streams every part once: each part is added to the index
and, in the same pass, searched exactly by a few probe queries (:class:`ExactTopK`), so the
exact top-k of the probes costs no second read of the gallery. It then raises ``nprobe``
(IVF indexes) until recall@k of the index against that exact answer reaches the target; an
index with a ``Refine`` stage gets the cheapest ``(nprobe, k_factor)`` pair that does (more
lists alone cannot recover near-ties the base index misranks below ``k_factor`` x k), and
measures how far the index's scores fall below the exact cosine of the same hits (the
margin near-duplicate removal must allow for). Memory: the index, the training sample, one
part and the probes' ``[P, k]`` results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from ktray.retrieval.index import (
    REFINE_K_FACTORS,
    build_index,
    default_nprobe,
    refine_k_factor,
    search,
    set_nprobe,
    training_size,
)
from ktray.retrieval.store import PartStore

log = logging.getLogger(__name__)


class ExactTopK:
    """Exact inner-product top-``k`` of fixed queries over vectors seen shard by shard."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)
        self.seen = 0

    def add(self, shard: np.ndarray) -> None:
        """Merge the next shard's vectors (ids continue from the previous shards)."""
        if not len(self.queries) or not len(shard):
            self.seen += len(shard)
            return
        flat = faiss.IndexFlatIP(shard.shape[1])
        flat.add(np.ascontiguousarray(shard, dtype=np.float32))
        s, i = flat.search(self.queries, min(self.k, len(shard)))
        s = np.concatenate([self.scores, s], axis=1)
        i = np.concatenate([self.ids, np.where(i >= 0, i + self.seen, -1)], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(s, top, axis=1)
        self.ids = np.take_along_axis(i, top, axis=1)
        self.seen += len(shard)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (ids -1 ignored)."""
    if not len(exact):
        return 1.0
    hits = [
        len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, int((e >= 0).sum()))
        for a, e in zip(approx, exact)
    ]
    return float(np.mean(hits))


@dataclass
class IndexReport:
    """What was built and how well it answers (written to the curate manifest)."""

    factory: str
    vectors: int
    train_vectors: int
    parts_read_for_sample: int
    nprobe: int | None
    recall: float | None
    target_recall: float
    reached: bool
    probe_queries: int
    k: int
    score_error: float
    """99th percentile of (exact - index) cosine over the probes' hits found by both."""
    tried: dict = field(default_factory=dict)
    """nprobe -> recall@k measured while tuning, at the chosen ``k_factor``."""
    k_factor: int | None = None
    """Re-ranking depth of a ``Refine`` index (``k_factor`` x k base candidates re-scored);
    None for indexes without one."""
    tried_grid: list = field(default_factory=list)
    """``[nprobe, k_factor, recall@k, relative search cost]`` of every pair measured."""
    train_seconds: float = 0.0
    add_seconds: float = 0.0
    tune_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def build_measured(
    factory: str,
    store: PartStore,
    probes: np.ndarray,
    seed: int,
    target_recall: float = 0.95,
    k: int = 10,
    nprobe: int | None = None,
    max_probes: int = 1000,
) -> tuple[faiss.Index, IndexReport]:
    """Build ``factory`` over ``store`` in one pass and tune it to ``target_recall``.

    Args:
        factory: faiss factory string (e.g. from :func:`choose_index`).
        store: the gallery's part files.
        probes: ``[P, D]`` unit query vectors; up to ``max_probes`` are drawn (seeded) to
            measure recall@``k`` against exact search.
        seed: seeds the training sample and the probe draw.
        target_recall: IVF indexes get the smallest power-of-two ``nprobe`` (from 1, and the
            default) whose recall reaches this; otherwise the best for its cost. Indexes with a
            ``Refine`` stage get the pair of ``nprobe`` and ``k_factor`` (from
            ``REFINE_K_FACTORS``) of least :func:`search_cost` that reaches it; otherwise the
            pair of best recall for its cost (``RECALL_PER_DOUBLING``).
        k: the recall depth.
        nprobe: a fixed nprobe (no tuning, k_factor as built; recall still measured).
        max_probes: the most probe queries.

    Returns:
        ``(index, report)``.
    """
    n = len(store)
    rng = np.random.default_rng([seed, 1])
    probes = np.asarray(probes, np.float32)
    if len(probes) > max_probes:
        probes = probes[np.sort(rng.choice(len(probes), max_probes, replace=False))]
    t0 = time.perf_counter()
    size = training_size(factory, n)
    reads0 = store.reads
    sample = store.sample(size, seed) if size else None
    sample_reads = store.reads - reads0
    exact = ExactTopK(probes, min(k, n))
    timer = {"first": None}

    def parts():
        timer["first"] = time.perf_counter()
        for vec in store:
            exact.add(vec)
            yield vec

    dim = probes.shape[1] if len(probes) else store.read(0).shape[1]
    index = build_index(factory, dim, sample, parts(), nprobe=nprobe)
    t1 = time.perf_counter()
    train_s = (timer["first"] or t1) - t0
    del sample

    ivf = faiss.try_extract_index_ivf(index)
    kf0 = refine_k_factor(index)
    grid: list[list] = []

    def measure(p: int | None, kf: int | None) -> float:
        set_nprobe(index, p, kf)
        _, ids = search(index, probes, exact.k) if len(probes) else (None, exact.ids)
        r = round(recall_at_k(ids, exact.ids), 4)
        grid.append([p, kf, r, search_cost(index, p, kf, exact.k)])
        log.info("tuning %s: nprobe %s, k_factor %s -> recall@%d %.4f", factory, p, kf, k, r)
        return r

    if nprobe is not None or (ivf is None and kf0 is None):
        p0 = int(ivf.nprobe) if ivf is not None else None
        chosen, chosen_kf, recall = p0, kf0, measure(p0, kf0)
    else:
        chosen, chosen_kf, recall = _tune(index, ivf, kf0, measure, target_recall, exact.k)
    set_nprobe(index, chosen, chosen_kf)
    tried = {p: r for p, kf, r, _ in grid if kf == chosen_kf and p is not None}
    error = _score_error(index, probes, exact)
    report = IndexReport(
        factory=factory,
        vectors=n,
        train_vectors=size,
        parts_read_for_sample=sample_reads,
        nprobe=chosen,
        recall=round(recall, 4),
        k_factor=chosen_kf,
        tried_grid=grid,
        target_recall=target_recall,
        reached=recall >= target_recall,
        probe_queries=len(probes),
        k=exact.k,
        score_error=error,
        tried=tried,
        train_seconds=train_s,
        add_seconds=t1 - (timer["first"] or t1),
        tune_seconds=time.perf_counter() - t1,
    )
    if not report.reached:
        log.warning(
            "index %s reaches recall@%d %.3f < target %.3f (nprobe %s, k_factor %s)",
            factory,
            exact.k,
            recall,
            target_recall,
            chosen,
            chosen_kf,
        )
    return index, report


PLATEAU = 0.002
"""A doubling of nprobe that gains less recall than this ends a walk that has not reached the
target (a ``Refine`` index: more lists will not get there at this depth)."""

RECALL_PER_DOUBLING = 0.01
"""Without a pair reaching the target, the pair of most ``recall - RECALL_PER_DOUBLING x
log2(cost)`` is chosen: one point of recall@k is worth a doubling of search cost, no more
(0.846 -> 0.894 at 100x the cost is not; 0.767 -> 0.843 at 2x is)."""

REFINE_COST = 4.0
"""Cost of re-scoring one candidate per byte of its refine code, relative to scanning one
byte of a base (PQ) code: a decode plus a random memory access against a table lookup."""


def search_cost(index: faiss.Index, nprobe: int | None, k_factor: int | None, k: int) -> float:
    """Model of one query's search cost, in base-code bytes: the codes of ``nprobe`` average
    inverted lists (all codes for non-IVF indexes) plus ``REFINE_COST`` x the refine codes of
    ``k_factor`` x ``k`` candidates. Used only to order pairs, not as a time."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        scanned = (nprobe or ivf.nprobe) * index.ntotal / ivf.nlist * ivf.code_size
    else:
        scanned = index.ntotal * index.sa_code_size()
    refined = 0.0
    ref = faiss.downcast_index(index)
    if k_factor is not None and isinstance(ref, faiss.IndexRefine):
        refined = REFINE_COST * k_factor * k * ref.refine_index.sa_code_size()
    return float(scanned + refined)


def _tune(index, ivf, kf0, measure, target_recall: float, k: int):
    """The cheapest (by :func:`search_cost`) ``(nprobe, k_factor)`` reaching the target.

    Depths are tried deepest first: for each, nprobe rises by powers of two (and the default)
    until the target is reached, the pair costs at least the cheapest found so far, or (for
    ``Refine`` indexes) a doubling gains less than ``PLATEAU``. Without a pair that reaches
    the target, the pair that best trades recall for cost (``RECALL_PER_DOUBLING``)."""
    ps = [None]
    if ivf is not None:
        ps = sorted(
            {1 << i for i in range(int(np.log2(ivf.nlist)) + 1)} | {default_nprobe(ivf.nlist)}
        )
    kfs = [None] if kf0 is None else sorted(set(REFINE_K_FACTORS) | {kf0}, reverse=True)
    best = None  # (cost, nprobe, k_factor, recall) of the cheapest pair reaching the target
    seen = []  # (recall, -cost, nprobe, k_factor) of every pair measured
    for kf in kfs:
        prev = None
        for p in ps:
            cost = search_cost(index, p, kf, k)
            if best is not None and cost >= best[0]:
                break
            r = measure(p, kf)
            seen.append((r, -cost, p, kf))
            if r >= target_recall:
                best = (cost, p, kf, r)
                break
            if kf0 is not None and prev is not None and r - prev < PLATEAU:
                break
            prev = r
    if best is not None:
        return best[1], best[2], best[3]
    r, _, p, kf = max(seen, key=lambda t: t[0] - RECALL_PER_DOUBLING * np.log2(max(-t[1], 1.0)))
    return p, kf, r


def _score_error(index: faiss.Index, probes: np.ndarray, exact: ExactTopK) -> float:
    """99th percentile of how much lower the index scores a hit than its exact cosine."""
    if not len(probes):
        return 0.0
    scores, ids = search(index, probes, exact.k)
    gaps = []
    for s, i, es, ei in zip(scores, ids, exact.scores, exact.ids):
        common, a, b = np.intersect1d(i, ei[ei >= 0], return_indices=True)
        gaps.append(es[b] - s[a])
    gaps = np.concatenate(gaps) if gaps else np.zeros(0)
    return float(max(0.0, np.quantile(gaps, 0.99))) if len(gaps) else 0.0


def dedup_nprobe(index) -> int | None:
    """Lists scanned by the leak check: 8x the tuned nprobe, at least the default, at most
    all (None for non-IVF indexes)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    return int(min(ivf.nlist, max(default_nprobe(ivf.nlist), 8 * ivf.nprobe)))
