"""FAISS index choice, building, persistence and search for L2-normalised embeddings.

Inner product on unit vectors is cosine similarity, so every index here uses
``METRIC_INNER_PRODUCT``. The choice follows autofaiss in spirit: exact ``Flat`` while the
gallery is small and its float32 copy fits the memory budget; beyond that an inverted file
with product-quantised codes, ``IVF{nlist},PQ{m}`` (``IVF{nlist}_HNSW32,PQ{m}`` once the
coarse quantizer itself gets large), trained on a sample and filled shard by shard.
Vector ids are the order of insertion (0, 1, ...), so callers keep a parallel array that
maps a vector id to its gallery image.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator

import faiss
import numpy as np

from ktray import storage
from ktray.errors import KtrayError

FLAT_MAX_VECTORS = 200_000
HNSW_QUANTIZER_MIN_NLIST = 16_384
MIN_POINTS_PER_CENTROID = 39  # below this faiss k-means warns; we shrink nlist instead
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_CENTROID
ID_BYTES = 8  # IVF lists store an int64 id per vector
_NORM_TOL = 1e-2


def choose_index(
    n_vectors: int,
    dim: int,
    memory_budget_bytes: int,
    flat_max_vectors: int = FLAT_MAX_VECTORS,
    reserve_bytes: int = 0,
) -> str:
    """Pick a faiss factory string for ``n_vectors`` embeddings of size ``dim``.

    Args:
        n_vectors: gallery size (number of crop embeddings).
        dim: embedding size.
        memory_budget_bytes: what the filled index may occupy.
        flat_max_vectors: below this size an exact index is used when it fits the budget.
        reserve_bytes: memory the build needs beside the index (its training sample, a part
            being added), taken off the budget for the codes.

    Returns:
        ``"Flat"``, ``"IVF{nlist},PQ{m}"`` or ``"IVF{nlist}_HNSW32,PQ{m}"``.
        ``nlist`` is ~4*sqrt(n) rounded to a power of two and at most n/39 (enough training
        points per centroid); ``m`` (bytes per code) divides ``dim``, aims at ``dim/4`` and
        shrinks until the codes, ids and centroids fit the budget.
    """
    if n_vectors <= 0 or dim <= 0:
        raise KtrayError(f"cannot index {n_vectors} vectors of dimension {dim}")
    flat_bytes = n_vectors * dim * 4
    if n_vectors < flat_max_vectors and flat_bytes + reserve_bytes <= memory_budget_bytes:
        return "Flat"
    if n_vectors < PQ_MIN_TRAIN:
        return "Flat"  # too few vectors to train a product quantizer; small anyway

    nlist = nlist_for(n_vectors)
    centroid_bytes = nlist * dim * 4
    per_vector = (memory_budget_bytes - reserve_bytes - centroid_bytes) / n_vectors - ID_BYTES
    target = max(1, dim // 4)
    # Exact-ish re-ranking: an 8-bit scalar-quantised copy (dim bytes per vector) re-scores
    # REFINE_K_FACTOR x k PQ candidates. Without it, PQ's quantised scores lose near-ties
    # (recall@10 0.56 -> 0.97 on 100k x 256 clustered vectors). Only when the budget allows.
    refine = per_vector - dim >= target
    if refine:
        per_vector -= dim
    m = next((m for m in range(min(target, int(per_vector)), 0, -1) if dim % m == 0), 0)
    if m == 0:
        need = n_vectors * (1 + ID_BYTES) + centroid_bytes + reserve_bytes
        raise KtrayError(
            f"memory budget {memory_budget_bytes} bytes is too small for {n_vectors} vectors "
            f"of dimension {dim} (needs at least {need})"
        )
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_MIN_NLIST else f"IVF{nlist}"
    return f"{coarse},PQ{m}" + (",Refine(SQ8)" if refine else "")


def nlist_for(n_vectors: int) -> int:
    """Inverted lists for ``n_vectors``: ~4*sqrt(n) as a power of two, at most n/39."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n_vectors))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n_vectors:
        nlist //= 2
    return nlist


def build_reserve_bytes(n_vectors: int, dim: int, part_rows: int) -> int:
    """What building an IVF-PQ index over ``n_vectors`` needs beside the index itself: its
    float32 training sample and ~3 float32 copies of the largest part being added."""
    sample = training_size(f"IVF{nlist_for(n_vectors)},PQ", n_vectors)
    return int((sample + 3 * part_rows) * dim * 4)


REFINE_K_FACTOR = 8  # the default re-ranking depth; build_measured tunes it with nprobe
REFINE_K_FACTORS = (8, 16, 32, 64, 128, 256)  # the depths build_measured tries
TWO_LEVEL_MIN_NLIST = 8192


def pq_bits(factory: str) -> int:
    """Bits per PQ sub-code of a factory string (``PQ16x4`` -> 4; 8 by default)."""
    match = re.search(r"PQ\d+x(\d+)", factory)
    return int(match.group(1)) if match else 8


def two_level_centroids(sample: np.ndarray, nlist: int, seed: int = 1234) -> np.ndarray:
    """``[nlist, D]`` unit centroids by two-level spherical k-means.

    ``sqrt(nlist)`` coarse clusters first, then each coarse cluster split into a share of the
    ``nlist`` centroids proportional to its size (never more than its points), so each
    vector is compared with ``~2*sqrt(nlist)`` centroids per iteration instead of ``nlist``.
    """
    sample = np.ascontiguousarray(sample, np.float32)
    dim = sample.shape[1]
    nc1 = max(1, int(round(math.sqrt(nlist))))
    km = faiss.Kmeans(dim, nc1, niter=20, spherical=True, seed=seed, max_points_per_centroid=2000)
    km.train(sample)
    _, assign = km.index.search(sample, 1)
    assign = assign[:, 0]
    sizes = np.bincount(assign, minlength=nc1)
    # centroids per coarse cluster: proportional to its size, at least 1 where it has points,
    # at most its points, summing to nlist
    share = np.minimum(sizes, np.maximum(sizes > 0, np.floor(sizes * nlist / len(sample))))
    share = share.astype(np.int64)
    order = np.argsort(-(sizes - share))
    i = 0
    while share.sum() < nlist:  # hand out the rounding remainder to clusters with room
        c = order[i % nc1]
        if share[c] < sizes[c]:
            share[c] += 1
        i += 1
    out = []
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # many small k-means: OpenMP start-up and spinning dominate
    try:
        for c in np.flatnonzero(share):
            pts = sample[assign == c]
            if share[c] == len(pts):
                out.append(pts)
                continue
            sub = faiss.Kmeans(dim, int(share[c]), niter=20, spherical=True, seed=seed + int(c))
            sub.train(pts)
            out.append(sub.centroids)
    finally:
        faiss.omp_set_num_threads(threads)
    return l2_normalize(np.concatenate(out))


def parse_nlist(factory: str) -> int:
    """The number of inverted lists in a factory string (0 for non-IVF indexes)."""
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 0


def training_size(factory: str, n_vectors: int) -> int:
    """How many vectors to train ``factory`` on (0: no training needed)."""
    nlist = parse_nlist(factory)
    if not nlist and "PQ" not in factory:
        return 0
    # faiss k-means subsamples to 256 points per centroid anyway; 64 per centroid is plenty
    # for the coarse quantizer, and PQ wants ~10k points for its 256 centroids per subspace.
    return min(n_vectors, max(64 * nlist, PQ_MIN_TRAIN if "PQ" in factory else 0))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: ~2*sqrt(nlist), at least 16 and at most nlist."""
    return int(min(nlist, max(16, round(2 * math.sqrt(nlist)))))


def as_embeddings(x: np.ndarray, dim: int, what: str = "embeddings") -> np.ndarray:
    """``x`` as C-contiguous float32 ``[N, dim]`` unit rows, or a one-line KtrayError."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise KtrayError(f"{what} has shape {tuple(x.shape)}, expected (N, {dim})")
    if len(x):
        norms = np.linalg.norm(x, axis=1)
        bad = np.abs(norms - 1.0) > _NORM_TOL
        if bad.any():
            raise KtrayError(
                f"{what} must be L2-normalised: {int(bad.sum())} of {len(x)} rows have norms "
                f"like {float(norms[bad][0]):.4g}"
            )
    return x


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation to float32. ``[N, D] -> [N, D]``."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def refine_k_factor(index: faiss.Index) -> int | None:
    """The re-ranking depth of an index with a ``Refine`` stage (``k_factor`` x k candidates
    of the base index are re-scored), None for other indexes. faiss saves it with the index."""
    index = faiss.downcast_index(index)
    return int(index.k_factor) if isinstance(index, faiss.IndexRefine) else None


def set_k_factor(index: faiss.Index, k_factor: int | None) -> None:
    """Set the re-ranking depth of an index with a ``Refine`` stage (a no-op for other
    indexes, or when ``k_factor`` is None)."""
    index = faiss.downcast_index(index)
    if k_factor is not None and isinstance(index, faiss.IndexRefine):
        index.k_factor = float(max(1, int(k_factor)))


def set_nprobe(index: faiss.Index, nprobe: int | None, k_factor: int | None = None) -> None:
    """Set the lists scanned per query of an IVF index and, when given, the re-ranking depth
    of a ``Refine`` index (:func:`set_k_factor`); either is a no-op where it does not apply.
    The re-ranking depth is left as it is when ``k_factor`` is None (the tuned one travels
    with the saved index)."""
    set_k_factor(index, k_factor)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or nprobe is None:
        return
    nprobe = int(min(max(1, nprobe), ivf.nlist))
    params = faiss.ParameterSpace()
    params.set_index_parameter(index, "nprobe", nprobe)
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        # The HNSW coarse quantizer must return at least nprobe candidate lists.
        params.set_index_parameter(index, "quantizer_efSearch", max(2 * nprobe, 64))


def build_index(
    factory: str,
    dim: int,
    train_sample: np.ndarray | None,
    shards: Iterable[np.ndarray],
    nprobe: int | None = None,
    k_factor: int | None = None,
) -> faiss.Index:
    """Train an inner-product index on a sample and fill it shard by shard.

    Args:
        factory: faiss factory string, e.g. from :func:`choose_index`.
        dim: embedding size D.
        train_sample: ``[T, D]`` unit vectors (None only for ``"Flat"``); see
            :func:`training_size`.
        shards: iterable of ``[N_i, D]`` unit vectors; only one shard is held at a time, so
            memory stays at the index plus the largest shard. Vector ids follow shard order.
        nprobe: lists scanned per query for IVF indexes (default :func:`default_nprobe`).
        k_factor: re-ranking depth of ``Refine`` indexes (default ``REFINE_K_FACTOR``; faiss's
            own default, 1, re-scores only the base index's top k).

    Returns:
        The filled index, ``index.ntotal == sum(N_i)``.
    """
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise KtrayError(f"bad faiss factory string {factory!r}: {str(e).splitlines()[-1]}")
    hnsw = _hnsw_quantizer(faiss.try_extract_index_ivf(index))
    if hnsw is not None:
        # faiss's defaults (efConstruction 40, efSearch 16) assign 17% of 10M clustered
        # vectors to a list other than their nearest (greedy search trapped in another
        # cluster's region of the graph): those are out of reach of any sane nprobe and
        # PQ-encoded against the wrong centroid. A denser-searched graph (+4 s for 16k
        # centroids) and efSearch 32 while training and adding: 99.8% assigned right.
        if not hnsw.ntotal:
            hnsw.hnsw.efConstruction = QUANTIZER_EF_CONSTRUCTION
        hnsw.hnsw.efSearch = max(int(hnsw.hnsw.efSearch), QUANTIZER_EF_ADD)
    if not index.is_trained:
        if train_sample is None:
            raise KtrayError(f"index {factory!r} needs a training sample")
        sample = as_embeddings(train_sample, dim, "training sample")
        need = max(parse_nlist(factory), 2 ** pq_bits(factory) if "PQ" in factory else 1)
        if len(sample) < need:
            raise KtrayError(
                f"index {factory!r} needs at least {need} training vectors, got {len(sample)}"
            )
        ivf = faiss.try_extract_index_ivf(index)
        ivf = faiss.downcast_index(ivf) if ivf is not None else None
        if isinstance(ivf, faiss.IndexIVFPQ):
            # index_factory turns on polysemous training (a Hamming-distance permutation of
            # the PQ codes); it is costly and only serves polysemous filtering, unused here.
            ivf.do_polysemous_training = False
        if ivf is not None and ivf.nlist >= TWO_LEVEL_MIN_NLIST and not ivf.quantizer.ntotal:
            # Flat k-means costs sample x nlist x dim per iteration (16k lists on 1M vectors:
            # ~15 min on 2 cores); two levels cost sample x 2*sqrt(nlist) x dim. faiss then
            # skips the coarse training of a quantizer that already holds nlist centroids.
            ivf.quantizer.add(two_level_centroids(sample, ivf.nlist))
        index.train(sample)
        del sample
    for i, shard in enumerate(shards):
        index.add(as_embeddings(shard, dim, f"shard {i}"))
    set_k_factor(index, k_factor if k_factor is not None else REFINE_K_FACTOR)
    nlist = parse_nlist(factory)
    if nlist:
        set_nprobe(index, nprobe if nprobe is not None else default_nprobe(nlist))
    return index


INDEX_RECIPE = 2
"""Version of what :func:`build_index` builds from a factory string; part of the key under
which the curate stage reuses a saved index (2: the HNSW quantizer's build and assignment
depths below; an index built before them is rebuilt, not reused)."""

QUANTIZER_EF_CONSTRUCTION = 200
QUANTIZER_EF_ADD = 32
"""HNSW coarse quantizer: graph build depth, and search depth while vectors are assigned to
lists. Measured on 16,384 two-level k-means centroids of 10M clustered 256-d vectors (share
of 50k vectors put in their nearest list): efConstruction 40 (faiss's default) with efSearch
16 / 32 / 64: 0.828 / 0.939 / 0.988; efConstruction 200: 0.982 / 0.998 / 0.9995."""


def _hnsw_quantizer(ivf) -> faiss.Index | None:
    """The HNSW coarse quantizer of an IVF index (``IVF{n}_HNSW32``), else None."""
    if ivf is None:
        return None
    q = faiss.downcast_index(ivf.quantizer)
    return q if isinstance(q, faiss.IndexHNSW) else None


def search(
    index: faiss.Index, queries: np.ndarray, k: int, batch_size: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search.

    Args:
        index: a filled index.
        queries: ``[Q, D]`` unit vectors.
        k: neighbours per query (more than ``index.ntotal`` is allowed).
        batch_size: queries per faiss call, bounding the result buffers of one call.

    Returns:
        ``(scores [Q, k] float32, ids [Q, k] int64)``, best first; missing results id -1,
        score -inf. A short row has seen the whole index, as the balanced selection takes it:
        an IVF index at ``nprobe`` below its lists answers such rows again from every list (all
        rows when ``k >= ntotal``); a web-scale gallery never comes back short at its depths.
    """
    queries = as_embeddings(queries, index.d, "queries")
    if k <= 0:
        raise KtrayError(f"search k must be positive, got {k}")
    ivf = faiss.try_extract_index_ivf(index)
    partial = ivf is not None and ivf.nprobe < ivf.nlist
    if partial and k >= index.ntotal:
        with _every_list(index, ivf):
            scores, ids = _search_rows(index, queries, k, batch_size)
    else:
        scores, ids = _search_rows(index, queries, k, batch_size)
        short = np.flatnonzero(ids[:, -1] < 0) if partial else []
        if len(short):
            with _every_list(index, ivf):
                scores[short], ids[short] = _search_rows(index, queries[short], k, batch_size)
    scores[ids < 0] = -np.inf
    return scores, ids


def _search_rows(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int):
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        s, i = index.search(queries[start : start + batch_size], k)
        scores[start : start + len(s)] = s
        ids[start : start + len(i)] = i
    return scores, ids


@contextlib.contextmanager
def _every_list(index: faiss.Index, ivf) -> Iterator[None]:
    """Within: ``index`` scans all the lists of its IVF part ``ivf``; its nprobe after."""
    saved = ivf.nprobe
    set_nprobe(index, ivf.nlist)
    try:
        yield
    finally:
        set_nprobe(index, saved)


def save_index(index: faiss.Index, uri: str) -> None:
    """Write an index atomically to a local path or ``s3://`` URI (see ``ktray.storage``).

    Readers see the old file or the whole new one: faiss writes to a temporary file, which is
    renamed (local) or uploaded under a temporary key and moved (object stores).
    """
    with storage.atomic_local_path(uri) as tmp:
        faiss.write_index(index, tmp)


def load_index(uri: str) -> faiss.Index:
    """Read an index written by :func:`save_index` (search parameters kept: nprobe and a
    ``Refine`` stage's ``k_factor``)."""
    if not storage.exists(uri):
        raise KtrayError(f"index file not found: {uri}")
    if not storage.is_remote(uri):
        return faiss.read_index(storage.fs_and_path(uri)[1])
    # Through a local file rather than bytes in memory: a large index is not held twice.
    fs, path = storage.fs_and_path(uri)
    with tempfile.TemporaryDirectory(prefix="ktray-index-") as d:
        local = os.path.join(d, "index.faiss")
        fs.get_file(path, local)
        return faiss.read_index(local)
