"""Query-balanced selection of gallery images (near-duplicate exclusion of protected images:
:mod:`ktray.retrieval.near_duplicates`).

"Query-balanced image crop retrieval" (the paper's transfer-set curation): every query image
gets the SAME number of distinct gallery images. Both sides are embedded as crops, so a
gallery image scores against a query as the best inner product over all (query crop, gallery
crop) pairs.

Selection, given each query's list of distinct gallery images ordered by that score:
queries are visited in a seeded random order, rank by rank (round-robin); at each turn a
query takes its best image not yet claimed by any query. So no image goes to two queries,
and a query whose favourite was taken by an earlier query takes its next one.

Searching deeper. Hits come from a top-k search per query crop. For a query, let tau be the
highest k-th score over its crops (crops whose search came back short are exhaustive and
do not count). Every gallery image whose best score is above tau is guaranteed to be in the
merged list with its true score, so the list is exact down to tau. A query that needs an
image below tau is searched again at twice the depth, and the round-robin is rerun. The
result is therefore the same as with an unlimited search, whatever ``k0`` is, unless a query
reaches ``max_k``; then its whole (inexact) list is used, the query is reported as capped
and any remaining gap is reported as shortfall with the reason ``max_k`` (never silently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from ktray.data.columns import IMAGE_ID, QUERY_ID, RANK, SCORE
from ktray.errors import KtrayError

log = logging.getLogger(__name__)

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class Candidates:
    """One query's merged hits: distinct gallery images, best score first."""

    __slots__ = ("images", "scores", "certified", "final")

    def __init__(self, images: np.ndarray, scores: np.ndarray, certified: int, final: bool):
        self.images = images  # [L] int64 gallery image ids
        self.scores = scores  # [L] float32 best score over crop pairs
        self.certified = certified  # leading entries known to be exact (all when final)
        self.final = final  # a deeper search cannot add anything


def id_map(image_of_vector) -> np.ndarray:
    """A vector -> gallery image map as an integer array, without copying one that already is
    (int32 halves a 100M-vector map to 400 MB; memmaps stay on disk); anything else -> int64."""
    if isinstance(image_of_vector, np.ndarray) and image_of_vector.dtype.kind in "iu":
        return image_of_vector
    return np.asarray(image_of_vector, dtype=np.int64)


def map_dtype(n_images: int) -> type:
    """The smallest id dtype of a map whose image ids are below ``n_images``."""
    return np.int32 if n_images <= np.iinfo(np.int32).max else np.int64


def merge_hits(
    scores: np.ndarray,
    ids: np.ndarray,
    gallery_image_of_vector: np.ndarray,
    exclude: np.ndarray | None = None,
    exhausted: bool = False,
) -> Candidates:
    """Merge one query's crop hits into distinct images ranked by best score.

    Args:
        scores: ``[C, k]`` scores of the query's C crops, best first.
        ids: ``[C, k]`` gallery vector ids, -1 where the search came back short.
        gallery_image_of_vector: ``[V]`` gallery image id of every gallery vector (any integer
            array, e.g. an int32 ``np.memmap``: only the hit rows are read).
        exclude: optional gallery image ids to drop: a sorted int array (memory ~ the
            excluded count), or a boolean mask over gallery image ids (True: dropped).
        exhausted: no deeper search is possible (k reached the gallery size or the cap).
    """
    valid = ids >= 0
    short = ~valid[:, -1]  # a crop that got fewer than k hits has seen all it can see
    kth = np.where(short, -np.inf, scores[:, -1])
    tau = -np.inf if exhausted else float(kth.max())
    final = exhausted or bool(short.all())

    img = gallery_image_of_vector[ids[valid]]
    sc = scores[valid]
    if exclude is not None and len(img):
        keep = ~(exclude[img] if exclude.dtype == bool else _in_sorted(img, exclude))
        img, sc = img[keep], sc[keep]
    # Best score per image: sort by (image, -score) and keep each image's first row.
    order = np.lexsort((-sc, img))
    img, sc = img[order], sc[order]
    first = np.ones(len(img), dtype=bool)
    first[1:] = img[1:] != img[:-1]
    img, sc = img[first], sc[first]
    # Rank by score, ties broken by image id so the order never depends on the search.
    order = np.lexsort((img, -sc))
    img, sc = img[order], sc[order]
    certified = len(img) if final else int(np.count_nonzero(sc > tau))
    return Candidates(img.astype(np.int64), sc.astype(np.float32), certified, final)


def round_robin(
    candidates: Sequence[Candidates], images_per_query: int, n_images: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """Assign distinct images to queries round-robin in a seeded query order.

    Which images are claimed is kept over the distinct images of the candidates (memory ~ the
    candidates, not ``n_images``, which is only an upper bound on the ids).

    Returns:
        ``(picks, starved)``: ``picks[q]`` are indexes into ``candidates[q].images`` in rank
        order; ``starved`` are the queries that ran past their certified entries before
        reaching the quota and are not final (they need a deeper search).
    """
    n_q = len(candidates)
    order = np.random.default_rng(seed).permutation(n_q)
    universe = np.unique(np.concatenate([c.images for c in candidates] or [np.zeros(0, np.int64)]))
    slots = [np.searchsorted(universe, c.images) for c in candidates]  # image -> claimed row
    claimed = np.zeros(len(universe), dtype=bool)
    picks: list[list[int]] = [[] for _ in range(n_q)]
    pointer = [0] * n_q
    starved: list[int] = []
    active = [int(q) for q in order]
    for _ in range(images_per_query):
        still = []
        for q in active:
            cand, slot = candidates[q], slots[q]
            limit = len(cand.images) if cand.final else cand.certified
            p = pointer[q]
            while p < limit and claimed[slot[p]]:
                p += 1
            if p < limit:
                claimed[slot[p]] = True
                picks[q].append(p)
                pointer[q] = p + 1
                still.append(q)
            else:
                pointer[q] = p
                if not cand.final:
                    starved.append(q)
        active = still
    return picks, starved


def balanced_select(
    search_fn: SearchFn,
    query_vectors: np.ndarray,
    query_image_ids: Sequence[Hashable],
    gallery_image_of_vector: np.ndarray,
    images_per_query: int,
    k0: int = 64,
    max_k: int = 4096,
    seed: int = 0,
    exclude_images: set[int] | np.ndarray | None = None,
    report: dict | None = None,
) -> tuple[dict[str, np.ndarray], dict[Hashable, int]]:
    """Query-balanced crop retrieval: the same number of distinct gallery images per query.

    Args:
        search_fn: ``search_fn(vectors [N, D], k) -> (scores [N, k], ids [N, k])``, best first,
            ids -1 for missing results (e.g. ``lambda v, k: search(index, v, k)``).
        query_vectors: ``[Nq, D]`` unit embeddings of all query crops.
        query_image_ids: ``[Nq]`` the query image each crop belongs to.
        gallery_image_of_vector: ``[V]`` int gallery image id (0..n_images-1) of every gallery
            vector, in index id order. Any integer dtype; it is not copied, so an int32 array
            or ``np.memmap`` of one keeps it at 4 bytes per vector (read in chunks for the
            checks, then only at the hits).
        images_per_query: the quota of distinct images per query image.
        k0: first search depth per crop; doubled for queries that need more.
        max_k: largest search depth (also capped at V).
        seed: shuffles the query order of the round-robin.
        exclude_images: gallery image ids never to select (e.g. :func:`remove_near_duplicates`).
        report: when given, filled with ``capped`` (queries whose search stopped at
            ``max_k`` below the gallery size: their lists are inexact), ``reasons`` (query ->
            why it is short: ``"max_k"`` or ``"gallery exhausted"``), ``max_depth`` and
            ``searches`` (crop searches run, all depths).

    Returns:
        ``(table, shortfall)``: ``table`` has columns ``query_id`` (the query image id),
        ``image_id`` (int64 gallery image id), ``rank`` (int32, 0..n-1 per query) and ``score``
        (float32), ordered by query (first-appearance order) then rank; ``shortfall`` maps
        each query that got fewer than ``images_per_query`` images to the number missing.
    """
    gallery_image_of_vector = id_map(gallery_image_of_vector)  # integer arrays: not copied
    query_vectors = np.asarray(query_vectors, dtype=np.float32)
    n_vectors = len(gallery_image_of_vector)
    if len(query_vectors) != len(query_image_ids):
        raise KtrayError(
            f"{len(query_vectors)} query vectors but {len(query_image_ids)} query image ids"
        )
    if images_per_query < 0 or k0 <= 0 or max_k <= 0:
        raise KtrayError(
            f"need images_per_query >= 0 and k0, max_k > 0 (got {images_per_query}, {k0}, {max_k})"
        )
    lo, hi, n_present, ascending = _map_stats(gallery_image_of_vector)
    if n_vectors and lo < 0:
        raise KtrayError("gallery image ids must be >= 0")
    n_images = hi + 1 if n_vectors else 0
    exclude = _exclusion_ids(exclude_images, n_images)
    if not ascending:  # count the distinct images with a mask (1 byte per image id)
        present = np.zeros(n_images, dtype=bool)
        for start in range(0, n_vectors, _CHUNK):
            present[gallery_image_of_vector[start : start + _CHUNK]] = True
        n_present = int(np.count_nonzero(present))
        n_excluded = int(np.count_nonzero(present[exclude])) if exclude is not None else 0
        del present
    elif exclude is not None and len(exclude):  # present iff found in the sorted map
        # the ids in the map's dtype (all <= its max): searchsorted would otherwise cast the
        # whole map to int64
        ex = exclude.astype(gallery_image_of_vector.dtype)
        pos = np.minimum(np.searchsorted(gallery_image_of_vector, ex), n_vectors - 1)
        n_excluded = int(np.count_nonzero(gallery_image_of_vector[pos] == exclude))
    else:
        n_excluded = 0
    n_available = n_present - n_excluded
    if n_available < images_per_query * len(set(query_image_ids)):
        # Shortfall is certain; starved queries will be searched down to max_k (exactly as
        # an unlimited search would assign the images), which costs the deepest searches.
        log.warning(
            "%d selectable gallery images for %d queries x %d: expect a shortfall",
            n_available,
            len(set(query_image_ids)),
            images_per_query,
        )

    queries = list(dict.fromkeys(query_image_ids))  # first-appearance order
    qpos = {q: i for i, q in enumerate(queries)}
    crop_q = np.fromiter((qpos[q] for q in query_image_ids), np.int64, len(query_image_ids))
    bounds = np.cumsum(np.bincount(crop_q, minlength=len(queries)))[:-1]
    crops_of = np.split(np.argsort(crop_q, kind="stable"), bounds)

    k_cap = min(max_k, n_vectors)
    empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, True)
    candidates = [empty] * len(queries)
    depth = [0] * len(queries)
    todo = list(range(len(queries))) if k_cap > 0 and images_per_query > 0 else []
    k = min(k0, k_cap)
    searches = 0
    while True:
        for batch in _batches(todo, crops_of, k):
            searches += sum(len(crops_of[q]) for q in batch)
            _search_into(
                candidates,
                batch,
                k,
                k_cap,
                crops_of,
                search_fn,
                query_vectors,
                gallery_image_of_vector,
                exclude,
            )
            for q in batch:
                depth[q] = k
        picks, starved = round_robin(candidates, images_per_query, n_images, seed)
        if not starved:
            break
        todo = sorted(starved)
        k = min(2 * max(depth[q] for q in todo), k_cap)
        log.info("%d queries need a deeper search, k=%d", len(todo), k)

    qid, img, rank, score, shortfall = [], [], [], [], {}
    for q, query in enumerate(queries):
        got = picks[q]
        cand = candidates[q]
        qid.extend([query] * len(got))
        img.append(cand.images[got])
        score.append(cand.scores[got])
        rank.append(np.arange(len(got), dtype=np.int32))
        if len(got) < images_per_query:
            shortfall[query] = images_per_query - len(got)
    capped = [
        queries[q] for q in range(len(queries)) if depth[q] >= k_cap > 0 and k_cap < n_vectors
    ]
    if capped:
        log.warning(
            "%d queries reached curate.max_k=%d (gallery %d vectors): their lists are inexact",
            len(capped),
            max_k,
            n_vectors,
        )
    if report is not None:
        capped_set = set(capped)
        report.update(
            capped=capped,
            max_depth=int(max(depth, default=0)),
            searches=searches,
            reasons={q: "max_k" if q in capped_set else "gallery exhausted" for q in shortfall},
        )
    table = {
        QUERY_ID: np.array(qid, dtype=object),
        IMAGE_ID: np.concatenate(img) if img else np.zeros(0, np.int64),
        RANK: np.concatenate(rank) if rank else np.zeros(0, np.int32),
        SCORE: np.concatenate(score) if score else np.zeros(0, np.float32),
    }
    return table, shortfall


def _batches(todo: list[int], crops_of: list[np.ndarray], k: int, max_hits: int = 1 << 23):
    """Split queries into groups whose crops' hits (``crops x k``) stay under ``max_hits``."""
    batch, n = [], 0
    for q in todo:
        c = len(crops_of[q]) * k
        if batch and n + c > max_hits:
            yield batch
            batch, n = [], 0
        batch.append(q)
        n += c
    if batch:
        yield batch


def _search_into(
    candidates, todo, k, k_cap, crops_of, search_fn, query_vectors, gallery_image_of_vector, exclude
) -> None:
    """Search the crops of queries ``todo`` at depth ``k`` and rebuild their candidates."""
    rows = np.concatenate([crops_of[q] for q in todo])
    scores, ids = search_fn(np.ascontiguousarray(query_vectors[rows]), k)
    scores, ids = np.asarray(scores), np.asarray(ids)
    if scores.shape != (len(rows), k) or ids.shape != (len(rows), k):
        raise KtrayError(
            f"search_fn returned shapes {scores.shape}, {ids.shape}; expected ({len(rows)}, {k})"
        )
    start = 0
    for q in todo:
        n = len(crops_of[q])
        candidates[q] = merge_hits(
            scores[start : start + n],
            ids[start : start + n],
            gallery_image_of_vector,
            exclude,
            exhausted=k >= k_cap,
        )
        start += n


_CHUNK = 1 << 20  # map rows read at a time by the checks (4 MiB of int32)


def _map_stats(iov: np.ndarray) -> tuple[int, int, int, bool]:
    """``(min, max, distinct count, ascending)`` of the vector -> image map, read in chunks
    (no copy of the map). The distinct count is exact only when ascending (each image's
    vectors consecutive, images in order, as the curate stage writes them); else 0."""
    lo, hi, changes, ascending, last = 0, -1, 0, True, None
    for start in range(0, len(iov), _CHUNK):
        c = np.asarray(iov[start : start + _CHUNK])
        lo = int(c.min()) if last is None else min(lo, int(c.min()))
        hi = max(hi, int(c.max()))
        if ascending:  # boolean temporaries only: 1 byte per row of the chunk
            ascending = bool((c[1:] >= c[:-1]).all()) and (last is None or c[0] >= last)
            changes += int(np.count_nonzero(c[1:] != c[:-1])) + int(last is None or c[0] != last)
        last = c[-1]
    return lo, hi, changes if ascending else 0, ascending


def _in_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """``values`` found in the sorted array ``sorted_ids`` (boolean, like ``np.isin``)."""
    if not len(sorted_ids):
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def _exclusion_ids(exclude_images, n_images: int) -> np.ndarray | None:
    """The excluded gallery image ids in range, sorted and unique (None: none given)."""
    if exclude_images is None:
        return None
    ids = (
        np.fromiter((int(i) for i in exclude_images), np.int64)
        if isinstance(exclude_images, (set, frozenset, list, tuple))
        else np.asarray(exclude_images, dtype=np.int64)
    )
    return np.unique(ids[(ids >= 0) & (ids < n_images)])
