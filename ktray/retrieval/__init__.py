"""Transfer-set curation by retrieval: crops, FAISS indexes, query-balanced selection.

Library code: never imports ray. The curate stage (``ktray.stages``) embeds query and gallery
crops, builds an index with :func:`choose_index` / :func:`build_index`, drops gallery images
that nearly duplicate labeled or test images (:func:`remove_near_duplicates`) and selects
the same number of distinct images per query (:func:`balanced_select`). At gallery scale:
:mod:`~ktray.retrieval.store` reads stored embedding parts one at a time (float16 or float32),
:mod:`~ktray.retrieval.tune` builds an index in one pass with its recall measured against exact
search and nprobe tuned, :mod:`~ktray.retrieval.dedup` removes gallery self-duplicates.
"""

from ktray.lazy import lazy_exports

# Lazy: a decode worker imports ``ktray.retrieval.crops`` (numpy, PIL) without faiss and the
# index code through this package; each name is imported from its module on first use.
_EXPORTS = {
    "Candidates": "ktray.retrieval.select",
    "FLAT_MAX_VECTORS": "ktray.retrieval.index",
    "FULL_IMAGE": "ktray.retrieval.crops",
    "as_embeddings": "ktray.retrieval.index",
    "balanced_select": "ktray.retrieval.select",
    "build_index": "ktray.retrieval.index",
    "build_reserve_bytes": "ktray.retrieval.index",
    "choose_index": "ktray.retrieval.index",
    "crop_boxes": "ktray.retrieval.crops",
    "crop_id": "ktray.retrieval.crops",
    "default_nprobe": "ktray.retrieval.index",
    "l2_normalize": "ktray.retrieval.index",
    "load_index": "ktray.retrieval.index",
    "merge_hits": "ktray.retrieval.select",
    "remove_near_duplicates": "ktray.retrieval.near_duplicates",
    "round_robin": "ktray.retrieval.select",
    "save_index": "ktray.retrieval.index",
    "search": "ktray.retrieval.index",
    "set_nprobe": "ktray.retrieval.index",
    "training_size": "ktray.retrieval.index",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Candidates",
    "FLAT_MAX_VECTORS",
    "FULL_IMAGE",
    "as_embeddings",
    "balanced_select",
    "build_index",
    "build_reserve_bytes",
    "choose_index",
    "crop_boxes",
    "crop_id",
    "default_nprobe",
    "l2_normalize",
    "load_index",
    "merge_hits",
    "remove_near_duplicates",
    "round_robin",
    "save_index",
    "search",
    "set_nprobe",
    "training_size",
]
