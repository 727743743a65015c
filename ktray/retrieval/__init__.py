"""Transfer-set curation by retrieval: crops, FAISS indexes, query-balanced selection.

Library code: never imports ray. The curate stage (``ktray.stages``) embeds query and gallery
crops, builds an index with :func:`choose_index` / :func:`build_index`, drops gallery images
that nearly duplicate labeled or test images (:func:`remove_near_duplicates`) and selects
the same number of distinct images per query (:func:`balanced_select`). At gallery scale:
:mod:`~ktray.retrieval.store` reads stored embedding parts one at a time (float16 or float32),
:mod:`~ktray.retrieval.tune` builds an index in one pass with its recall measured against exact
search and nprobe tuned, :mod:`~ktray.retrieval.dedup` removes gallery self-duplicates.
"""

from ktray.retrieval.crops import FULL_IMAGE, crop_boxes, crop_id
from ktray.retrieval.index import (
    FLAT_MAX_VECTORS,
    as_embeddings,
    build_index,
    build_reserve_bytes,
    choose_index,
    default_nprobe,
    l2_normalize,
    load_index,
    save_index,
    search,
    set_nprobe,
    training_size,
)
from ktray.retrieval.near_duplicates import remove_near_duplicates
from ktray.retrieval.select import Candidates, balanced_select, merge_hits, round_robin

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
