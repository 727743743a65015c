"""Gallery self-duplicates: of near-identical gallery images, keep one.

Web galleries repeat images (re-uploads, resizes, re-encodes). Every gallery image's full-image
vector (its first crop) is searched in the gallery index; hits scoring above ``threshold -
margin`` are re-checked with the exact cosine of the stored vectors, and the images linked by
exact hits above ``threshold`` form groups (connected components) of which the lowest image id
is kept. Queries come in batches (one part file at a time) and the exact re-check reads the
candidates' vectors once at the end: memory is bounded by a batch and the candidate pairs,
not by the gallery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import faiss
import numpy as np

from ktray.retrieval.index import search
from ktray.retrieval.select import id_map


def first_vectors(gallery_image_of_vector: np.ndarray) -> np.ndarray:
    """Vector id of each image's first vector (the full image in the crop order)."""
    iov = np.asarray(gallery_image_of_vector)
    if not len(iov):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], iov[1:] != iov[:-1]])).astype(np.int64)


def gallery_duplicates(
    index: faiss.Index,
    queries: Iterable[tuple[np.ndarray, np.ndarray]],
    vectors_of: Callable[[np.ndarray], np.ndarray],
    gallery_image_of_vector: np.ndarray,
    threshold: float,
    margin: float = 0.0,
    k: int = 16,
) -> tuple[set[int], int]:
    """Gallery image ids to drop so that no two kept full images are near-identical.

    Args:
        index: the gallery index (vector ids in the order of ``gallery_image_of_vector``).
        queries: batches ``(vector ids [B], vectors [B, D])`` of the images' full-image
            vectors (:func:`first_vectors`), e.g. one batch per part file read in order.
        vectors_of: ``vectors_of(ids [N]) -> [N, D]`` exact stored vectors; called once,
            for the approximate hits only.
        gallery_image_of_vector: ``[V]`` gallery image id per vector (each image's vectors
            contiguous, the full image first).
        threshold: exact cosine above which two full images are duplicates.
        margin: approximate hits down to ``threshold - margin`` are re-checked.
        k: neighbours searched per image (a duplicate group larger than ``k`` may be split).

    Returns:
        ``(dropped image ids, groups)``: ``groups`` is the number of duplicate groups.
    """
    iov = id_map(gallery_image_of_vector)
    is_first = np.zeros(len(iov), dtype=bool)
    is_first[first_vectors(iov)] = True
    k = int(min(k, max(1, index.ntotal)))
    cand = []
    for q_ids, q in queries:
        if not len(q_ids):
            continue
        scores, ids = search(index, q, k)
        r, c = np.nonzero((scores > threshold - margin) & (ids >= 0))
        hit = ids[r, c]
        keep = is_first[hit] & (iov[hit] != iov[q_ids[r]])  # full image vs full image
        cand.append(np.stack([q_ids[r[keep]], hit[keep]], axis=1))
    cand = (
        np.unique(np.sort(np.concatenate(cand), axis=1), axis=0)
        if cand
        else np.zeros((0, 2), np.int64)
    )
    if not len(cand):
        return set(), 0
    # One exact pass over the candidates: each part holding one is read once.
    uniq, inv = np.unique(cand, return_inverse=True)
    vec = vectors_of(uniq)
    inv = inv.reshape(-1, 2)
    exact = np.einsum("nd,nd->n", vec[inv[:, 0]], vec[inv[:, 1]])
    pairs = iov[cand[exact > threshold]]
    if not len(pairs):
        return set(), 0
    return _drop_all_but_lowest(np.unique(np.sort(pairs, axis=1), axis=0))


def _drop_all_but_lowest(pairs: np.ndarray) -> tuple[set[int], int]:
    """Union-find over the images in ``pairs``; every component keeps its lowest id."""
    nodes, inv = np.unique(pairs, return_inverse=True)
    parent = np.arange(len(nodes))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in inv.reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # nodes are sorted: lower index = lower id
    roots = np.array([find(i) for i in range(len(nodes))])
    dropped = {int(nodes[i]) for i in range(len(nodes)) if roots[i] != i}
    return dropped, int(len(np.unique(roots)))
