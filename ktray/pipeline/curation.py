"""Curation's tables (no ray here): config checks, the gallery, query sets, the transfer set.

The ``curate`` stage (``ktray.stages.curate``) embeds these tables with Ray Data and selects
with :mod:`ktray.retrieval`; this module holds what it needs around that, so the checks that
can fail on bad input run before any Ray work.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ktray import storage
from ktray.data import columns as C
from ktray.data.readers import read_gallery
from ktray.errors import KtrayError
from ktray.retrieval import crop_boxes
from ktray.retrieval.embed import GALLERY_INDEX
from ktray.pipeline.tasks import prepare_task, transfer_uri
from ktray.pipeline.validate import check_backbone_name, check_timm_name

ORIGIN = "origin"
IN_DOMAIN, GENERIC, GALLERY = "in_domain", "generic", "gallery"
TRANSFER_SCHEMA = pa.schema([(C.IMAGE_ID, pa.string()), (C.SOURCE, pa.string()),
                             (C.LABEL, pa.int64()), (C.QUERY_ID, pa.string()),
                             (C.RANK, pa.int32()), (C.SCORE, pa.float32())])


def check_config(cfg) -> None:
    """Raise a one-line KtrayError on the first bad ``curate.*`` value."""
    cur = cfg.curate
    positive = {"images_per_query": cur.images_per_query, "img_size": cur.img_size,
                "max_k": cur.max_k, "batch_size": cur.batch_size, "shard_rows": cur.shard_rows}
    for key, value in positive.items():
        if value < 1:
            raise KtrayError(f"curate.{key} must be at least 1, got {value}")
    if cur.k0 < 0 or cur.report_queries < 0:
        raise KtrayError("curate.k0 and curate.report_queries must be >= 0")
    if not 0.0 < cur.dedup_threshold <= 1.0:
        raise KtrayError(f"curate.dedup_threshold must be in (0, 1], got {cur.dedup_threshold}")
    if cur.memory_budget_gb <= 0:
        raise KtrayError(f"curate.memory_budget_gb must be positive, got {cur.memory_budget_gb}")
    try:
        scales = tuple(float(s) for s in cur.scales)
    except (TypeError, ValueError):
        raise KtrayError(f"curate.scales must be numbers, got {cur.scales!r}")
    crop_boxes(cur.random_crops, cur.grid, scales, 0, "")  # raises on bad crop settings
    if cur.encoder and not cur.encoder.startswith(("open_clip:", "efficientnet_lite")):
        check_timm_name(cur.encoder, "curate.encoder")
    else:
        check_backbone_name(cur.encoder or cfg.teacher.backbone)


def split(info: dict, name: str) -> pa.Table | None:
    """A split of the prepared task (``prepare_task(cfg)``) as an image table, or None."""
    uri = info["outputs"].get(name)
    return storage.read_parquet(uri, columns=[C.IMAGE_ID, C.SOURCE]) if uri else None


def indexed(*tables: pa.Table | None) -> pa.Table:
    """``gallery_index, image_id, source`` rows of the tables, concatenated (index 0..N-1)."""
    parts = [t.select([C.IMAGE_ID, C.SOURCE]) for t in tables if t is not None and len(t)]
    if not parts:
        return pa.table({GALLERY_INDEX: pa.array([], pa.int64()), C.IMAGE_ID: pa.array(
            [], pa.string()), C.SOURCE: pa.array([], pa.string())})
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
        raise KtrayError("curate.gallery is empty and the task has neither unlabeled images "
                         "nor a generic pool (data.generic_images) to use as the gallery")
    ids = [i for t in tables for i in t[C.IMAGE_ID].to_pylist()]
    if len(set(ids)) != len(ids):
        tables = [t.set_column(0, C.IMAGE_ID, pa.array(
            [f"{o}/{i}" for o, i in zip(t[ORIGIN].to_pylist(), t[C.IMAGE_ID].to_pylist())],
            pa.string())) for t in tables]
    return pa.concat_tables(tables)


def transfer_table(gallery: pa.Table, selected: dict) -> pa.Table:
    """The transfer set: the selected gallery images (``balanced_select``'s table, whose
    ``image_id`` are gallery row numbers) as an image table + ``query_id, rank, score``."""
    rows = pa.array(np.asarray(selected[C.IMAGE_ID], dtype=np.int64))
    picked = gallery.take(rows)
    return pa.Table.from_arrays([
        picked[C.IMAGE_ID], picked[C.SOURCE], pa.array([C.UNLABELED] * len(rows), pa.int64()),
        pa.array([str(q) for q in selected[C.QUERY_ID]], pa.string()),
        pa.array(np.asarray(selected[C.RANK], dtype=np.int32)),
        pa.array(np.asarray(selected[C.SCORE], dtype=np.float32)),
    ], schema=TRANSFER_SCHEMA)


def summary(gallery: pa.Table, queries: pa.Table, transfer: pa.Table, shortfall: dict,
            excluded: set[int], images_per_query: int, examples: int = 20) -> dict:
    """The manifest's account of a selection: counts per query, shortfall, exclusions."""
    per_query = {q: 0 for q in queries[C.IMAGE_ID].to_pylist()}
    for q in transfer[C.QUERY_ID].to_pylist():
        per_query[q] = per_query.get(q, 0) + 1
    counts: dict[int, int] = {}
    for n in per_query.values():
        counts[n] = counts.get(n, 0) + 1
    # queries whose every crop was unreadable never reached the selection: they are short too
    short = {q: images_per_query - n for q, n in per_query.items() if n < images_per_query}
    short.update({str(q): int(v) for q, v in shortfall.items()})
    origins = gallery[ORIGIN].to_pylist()
    ex_ids = gallery[C.IMAGE_ID].to_pylist()
    chosen = origins_of(gallery, transfer)
    known = [o for o in chosen if o != GALLERY]
    return {
        "queries": len(per_query), "images_per_query": images_per_query,
        "unique_images": len(set(transfer[C.IMAGE_ID].to_pylist())),
        "per_query_counts": {str(k): v for k, v in sorted(counts.items())},
        "shortfall": {"queries": len(short), "images": int(sum(short.values())),
                      "examples": dict(sorted(short.items())[:examples])},
        "excluded": {"images": len(excluded),
                     "examples": sorted(ex_ids[i] for i in sorted(excluded)[:examples])},
        "gallery_origins": {o: origins.count(o) for o in sorted(set(origins))},
        "in_domain_fraction": (sum(o == IN_DOMAIN for o in known) / len(known))
        if known and len(known) == len(chosen) else None,
        "score": _score_stats(transfer[C.SCORE].to_numpy()),
    }


def origins_of(gallery: pa.Table, transfer: pa.Table) -> list[str]:
    """The gallery origin of every transfer-set row."""
    origin = dict(zip(gallery[C.IMAGE_ID].to_pylist(), gallery[ORIGIN].to_pylist()))
    return [origin[i] for i in transfer[C.IMAGE_ID].to_pylist()]


def _score_stats(scores: np.ndarray) -> dict | None:
    if not len(scores):
        return None
    q = np.quantile(scores, [0.0, 0.5, 1.0])
    return {"min": float(q[0]), "median": float(q[1]), "max": float(q[2]),
            "mean": float(scores.mean())}
