"""The curate stage's index and selection in Ray: the gallery index built in one Ray task
placed by its resources (``curate.index_cpus`` / ``index_memory_gb``), the exact leak check in
Ray tasks beside it, and the balanced selection's searches in :class:`SearchActor` s that load
the index once per node."""

from __future__ import annotations

import time

import numpy as np

from ktray.config import Config
from ktray.pipeline import curation_index
from ktray.retrieval.index import load_index, search, set_nprobe
from ktray.retrieval.near_duplicates import scan_near_duplicates
from ktray.retrieval.store import PartStore


def build_and_scan(cfg: Config, out: str, query_vecs, protected_vecs, parts, image_of_vector):
    """The index build (:func:`curation_index.build_and_protect`) as one Ray task, and beside it
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
    excluded, leak = curation_index.leak_summary(
        cfg, pairs, cos, image_of_vector, len(image_of_vector)
    )
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
    return curation_index.build_and_protect(
        cfg, out, query_vecs, protected_vecs, parts, image_of_vector
    )


class SearchActor:
    """Holds the gallery index once and answers top-k searches of query crop batches at the
    tuned ``nprobe`` and re-ranking depth ``k_factor`` (None: as saved with the index)."""

    def __init__(
        self, index_uri: str, nprobe: int | None, threads: int, k_factor: int | None = None
    ):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.index = load_index(index_uri)
        set_nprobe(self.index, nprobe or None, k_factor)

    def search(self, vectors: np.ndarray, k: int):
        return search(self.index, vectors, k)


class SearchPool:
    """``curate.search_actors`` :class:`SearchActor` (default: one per alive node, pinned
    to it, with ``curate.search_cpus`` CPUs each, default all of that node's); a search call
    splits its queries over them and concatenates the answers in order."""

    MIN_CHUNK = 256

    def __init__(
        self, cfg: Config, index_uri: str, nprobe: int | None, k_factor: int | None = None
    ):
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
                    actor.options(**opts).remote(index_uri, nprobe, max(1, int(cpus)), k_factor)
                )
        else:
            for n in nodes:
                cpus = cur.search_cpus or float(n["Resources"]["CPU"])
                strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                self.actors.append(
                    actor.options(num_cpus=cpus, scheduling_strategy=strategy).remote(
                        index_uri, nprobe, max(1, int(cpus)), k_factor
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
