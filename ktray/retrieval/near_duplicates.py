"""Near copies of protected (labeled, validation, test) images among gallery vectors.

A transfer set must never hold a test image, one of its crops or a near copy of it: gallery
images with a crop above a cosine threshold to any protected embedding are excluded, either
exactly (:func:`scan_near_duplicates`, the curate stage's leak check, or
:func:`remove_near_duplicates` over an array) or through the gallery's index with a margin
for quantised scores (:func:`remove_near_duplicates` given a faiss index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import faiss
import numpy as np

from ktray.retrieval.index import as_embeddings, search, set_nprobe
from ktray.retrieval.select import id_map


def remove_near_duplicates(
    gallery: np.ndarray | faiss.Index,
    protected_vectors: np.ndarray,
    gallery_image_of_vector: np.ndarray,
    threshold: float,
    k0: int = 16,
    batch_size: int = 65_536,
    margin: float = 0.0,
    vectors_of: Callable[[np.ndarray], np.ndarray] | None = None,
    nprobe: int | None = None,
    report: dict | None = None,
) -> set[int]:
    """Gallery images with a crop too similar to a protected (labeled or test) embedding.

    Any gallery vector with cosine similarity above ``threshold`` to any protected vector
    excludes its whole image, so test images (or their crops, or their near copies) never
    enter a transfer set. Apply the result as ``exclude_images`` of :func:`balanced_select`.

    Args:
        gallery: ``[V, D]`` unit gallery embeddings (exact, O(V*P*D); scanned in batches, fine
            for a memory map), or the gallery's faiss index (protected vectors are searched
            in it: scales to large galleries, but IVF-PQ scores are quantised, typically
            0.02-0.1 below the true cosine, so use ``margin`` and ``vectors_of``).
        protected_vectors: ``[P, D]`` unit embeddings to protect (all their crops).
        gallery_image_of_vector: ``[V]`` gallery image id of every gallery vector.
        threshold: cosine similarity above which a gallery vector is a near duplicate.
        k0: first search depth in the index path; doubled for protected vectors whose
            k-th hit is still above the cut.
        batch_size: gallery rows per batch in the array path.
        margin: index path only: candidates are hits above ``threshold - margin``.
        vectors_of: index path only: ``vectors_of(ids [N]) -> [N, D]`` exact gallery vectors
            (e.g. rows of the stored embeddings); candidates are kept only if their exact
            cosine is above ``threshold``. Without it every candidate is excluded, so a
            margin can only exclude more.
        nprobe: index path, IVF indexes: lists scanned for this search only (a near copy in
            a list the selection's nprobe skips would be missed; protected vectors are few,
            so scanning more lists is cheap). Default: the index's own.
        report: when given (index path), filled with ``candidates`` (approximate (protected,
            gallery vector) hits above ``threshold - margin``), ``confirmed`` (those whose
            exact cosine is above ``threshold``; all of them without ``vectors_of``) and
            ``pairs``: per excluded image its best ``(image, protected row, exact cosine,
            index score)``, highest cosine first.

    Returns:
        The set of gallery image ids to exclude.
    """
    gallery_image_of_vector = id_map(gallery_image_of_vector)
    if len(protected_vectors) == 0:
        return set()
    dim = gallery.d if isinstance(gallery, faiss.Index) else np.shape(gallery)[1]
    protected = as_embeddings(protected_vectors, dim, "protected vectors")
    if isinstance(gallery, faiss.Index):
        ivf = faiss.try_extract_index_ivf(gallery)
        before = ivf.nprobe if ivf is not None else None
        if ivf is not None and nprobe is not None:
            set_nprobe(gallery, nprobe)
        try:
            vec, approx = _index_near_duplicates(gallery, protected, threshold - margin, k0)
        finally:
            if before is not None:
                set_nprobe(gallery, before)
        candidates = len(vec)
        cos = approx
        if vectors_of is not None and len(vec):
            pairs = vec  # [N, 2] (protected row, gallery id)
            ids, inverse = np.unique(pairs[:, 1], return_inverse=True)
            exact = as_embeddings(vectors_of(ids), dim, "vectors_of(ids)")
            cos = np.einsum("nd,nd->n", protected[pairs[:, 0]], exact[inverse])
            keep = cos > threshold
            vec, cos, approx = pairs[keep], cos[keep], approx[keep]
        if report is not None:
            report.update(
                candidates=int(candidates),
                confirmed=int(len(vec)),
                pairs=_best_pairs(vec, cos, approx, gallery_image_of_vector),
            )
        vec = vec[:, 1]
    else:
        # Exact: the best protected match of every gallery vector, one batch at a time.
        index = faiss.IndexFlatIP(dim)
        index.add(protected)
        hits = []
        for start in range(0, len(gallery), batch_size):
            batch = as_embeddings(gallery[start : start + batch_size], dim, "gallery vectors")
            scores, _ = index.search(batch, 1)
            hits.append(start + np.flatnonzero(scores[:, 0] > threshold))
        vec = np.concatenate(hits) if hits else np.zeros(0, np.int64)
    return {int(i) for i in np.unique(gallery_image_of_vector[np.unique(vec)])}


def scan_near_duplicates(
    parts: Iterable[tuple[int, np.ndarray]],
    protected_vectors: np.ndarray,
    threshold: float,
    batch_size: int = 65_536,
) -> tuple[np.ndarray, np.ndarray]:
    """Every (protected, gallery vector) pair whose exact cosine is above ``threshold``.

    No index is involved, so no quantisation or unprobed list can hide a near copy: each
    gallery vector is compared with every protected vector (a range search over a flat
    index of the protected vectors, which are few). Costs ``P x V x D`` multiply-adds, one
    read of the gallery; the curate stage spreads it over the cluster, part by part.

    Args:
        parts: ``(first vector id, vectors [N, D])`` of the gallery, e.g. one per part file.
        protected_vectors: ``[P, D]`` unit embeddings of labeled / validation / test images.
        threshold: cosine above which a gallery vector is a near copy.

    Returns:
        ``(pairs [M, 2] (protected row, gallery vector id), cosine [M])``.
    """
    protected = np.ascontiguousarray(protected_vectors, dtype=np.float32)
    pairs, cos = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    if not len(protected):
        return pairs[0], cos[0]
    flat = faiss.IndexFlatIP(protected.shape[1])
    flat.add(as_embeddings(protected, protected.shape[1], "protected vectors"))
    for offset, vec in parts:
        for start in range(0, len(vec), batch_size):
            chunk = as_embeddings(vec[start : start + batch_size], flat.d, "gallery vectors")
            lims, dist, ids = flat.range_search(chunk, float(threshold))
            rows = np.repeat(np.arange(len(chunk), dtype=np.int64), np.diff(lims).astype(np.int64))
            pairs.append(np.stack([ids.astype(np.int64), offset + start + rows], axis=1))
            cos.append(dist.astype(np.float32))
    return np.concatenate(pairs), np.concatenate(cos)


def best_pairs(pairs, cos, image_of_vector, approx=None) -> list[tuple]:
    """Per image, its best ``(image, protected row, exact cosine, index score)``, best first
    (index score None without ``approx``)."""
    approx = np.full(len(cos), np.nan, np.float32) if approx is None else approx
    out = _best_pairs(np.asarray(pairs), np.asarray(cos), approx, image_of_vector)
    return [(g, r, c, None if a != a else a) for g, r, c, a in out]


def _best_pairs(pairs, cos, approx, image_of_vector) -> list[tuple[int, int, float, float]]:
    """Per image, its best ``(image, protected row, exact cosine, index score)``, best first."""
    if not len(pairs):
        return []
    img = image_of_vector[pairs[:, 1]]
    order = np.lexsort((-cos, img))
    first = np.ones(len(order), bool)
    first[1:] = img[order][1:] != img[order][:-1]
    best = order[first]
    best = best[np.argsort(-cos[best], kind="stable")]
    return [
        (int(img[i]), int(pairs[i, 0]), round(float(cos[i]), 4), round(float(approx[i]), 4))
        for i in best
    ]


def _index_near_duplicates(index: faiss.Index, protected: np.ndarray, cut: float, k0: int):
    """``[N, 2]`` (protected row, gallery vector id) pairs scoring above ``cut`` in ``index``,
    and their index scores ``[N]`` (each pair once, at its first, shallowest search)."""
    pairs, scores_out = [], []
    rows, k = np.arange(len(protected)), min(k0, max(1, index.ntotal))
    while len(rows):
        scores, ids = search(index, protected[rows], k)
        hit = (scores > cut) & (ids >= 0)
        r, c = np.nonzero(hit)
        pairs.append(np.stack([rows[r], ids[r, c]], axis=1))
        scores_out.append(scores[r, c])
        if k >= index.ntotal:
            break
        # Rows whose k-th hit is still above the cut may have more: search them deeper.
        rows, k = rows[hit[:, -1]], min(2 * k, index.ntotal)
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs, scores_out = np.concatenate(pairs), np.concatenate(scores_out)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, scores_out[first]
