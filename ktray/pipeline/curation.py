"""Curation's tables (no ray here): config checks, the gallery, query sets, the transfer set.

The ``curate`` stage (``ktray.stages.curate``) embeds these tables with Ray Data and selects
with :mod:`ktray.retrieval` (the index and selection: :mod:`ktray.pipeline.curation_index`;
the manifest's account: :mod:`ktray.pipeline.curation_summary`); this module holds the tables
around that, so the checks that can fail on bad input run before any Ray work.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ktray import storage
from ktray.data import columns as C
from ktray.data.readers import read_gallery
from ktray.errors import KtrayError
from ktray.pipeline.tasks import prepare_task, transfer_uri
from ktray.retrieval import crop_boxes
from ktray.retrieval.embed import GALLERY_INDEX

ORIGIN = "origin"
IN_DOMAIN, GENERIC, GALLERY = "in_domain", "generic", "gallery"
TRANSFER_SCHEMA = pa.schema(
    [
        (C.IMAGE_ID, pa.string()),
        (C.SOURCE, pa.string()),
        (C.LABEL, pa.int64()),
        (C.QUERY_ID, pa.string()),
        (C.RANK, pa.int32()),
        (C.SCORE, pa.float32()),
    ]
)


def check_config(cfg) -> None:
    """Curation's checks beyond each value's own (those run when ``CurateConfig`` is built):
    the crop settings as a whole, and the encoder with its weights. One-line KtrayError."""
    from ktray.models.available import check_encoder

    cur = cfg.curate
    crop_boxes(cur.random_crops, cur.grid, tuple(float(s) for s in cur.scales), 0, "")
    try:
        if cur.encoder:
            check_encoder(cur.encoder, cur.pretrained)
        else:
            check_encoder(
                cfg.teacher.backbone, cfg.teacher.pretrained and not cfg.teacher.checkpoint
            )
    except KtrayError as e:
        raise KtrayError(
            f"{'curate.encoder' if cur.encoder else 'teacher.backbone'}: {e}"
        ) from None


def check_index(factory: str, dim: int) -> None:
    """A ``curate.index`` factory string that faiss cannot build for ``dim``-d embeddings
    fails here, before any embedding work (one-line KtrayError)."""
    if factory == "auto":
        return
    import faiss

    try:
        faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        why = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(e).strip().splitlines()[-1])
        raise KtrayError(
            f"curate.index: faiss cannot build {factory!r} for {dim}-d embeddings: {why}"
        ) from None


def split(info: dict, name: str) -> pa.Table | None:
    """A split of the prepared task (``prepare_task(cfg)``) as an image table, or None."""
    uri = info["outputs"].get(name)
    return storage.read_parquet(uri, columns=[C.IMAGE_ID, C.SOURCE]) if uri else None


def indexed(*tables: pa.Table | None) -> pa.Table:
    """``gallery_index, image_id, source`` rows of the tables, concatenated (index 0..N-1)."""
    parts = [t.select([C.IMAGE_ID, C.SOURCE]) for t in tables if t is not None and len(t)]
    if not parts:
        return pa.table(
            {
                GALLERY_INDEX: pa.array([], pa.int64()),
                C.IMAGE_ID: pa.array([], pa.string()),
                C.SOURCE: pa.array([], pa.string()),
            }
        )
    t = pa.concat_tables(parts)
    return t.add_column(0, GALLERY_INDEX, pa.array(np.arange(len(t), dtype=np.int64)))


def image_sets(info: dict) -> tuple[pa.Table, pa.Table]:
    """The query and protected image sets of a prepared task (``prepare_task(cfg)``), both as
    ``indexed`` tables: queries are the labeled train images, protected the validation and
    test images (the queries are protected too, from their own embeddings). The same for
    classification and segmentation: retrieval reads no label and no mask, so a segmentation
    task's labeled images query the gallery as a classification task's do, and its test images
    are kept out of the transfer set by the same leak scan."""
    queries = indexed(split(info, "train"))
    if not len(queries):
        raise KtrayError("curate needs labeled train images as queries; there are none")
    return queries, indexed(split(info, "val"), split(info, "test"))


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
        raise KtrayError(
            "curate.gallery is empty and the task has neither unlabeled images "
            "nor a generic pool (data.generic_images) to use as the gallery"
        )
    ids = [i for t in tables for i in t[C.IMAGE_ID].to_pylist()]
    if len(set(ids)) != len(ids):
        tables = [
            t.set_column(
                0,
                C.IMAGE_ID,
                pa.array(
                    [f"{o}/{i}" for o, i in zip(t[ORIGIN].to_pylist(), t[C.IMAGE_ID].to_pylist())],
                    pa.string(),
                ),
            )
            for t in tables
        ]
    return pa.concat_tables(tables)


def transfer_table(gallery: pa.Table, selected: dict) -> pa.Table:
    """The transfer set: the selected gallery images (``balanced_select``'s table, whose
    ``image_id`` are gallery row numbers) as an image table + ``query_id, rank, score``."""
    rows = pa.array(np.asarray(selected[C.IMAGE_ID], dtype=np.int64))
    picked = gallery.take(rows)
    return pa.Table.from_arrays(
        [
            picked[C.IMAGE_ID],
            picked[C.SOURCE],
            pa.array([C.UNLABELED] * len(rows), pa.int64()),
            pa.array([str(q) for q in selected[C.QUERY_ID]], pa.string()),
            pa.array(np.asarray(selected[C.RANK], dtype=np.int32)),
            pa.array(np.asarray(selected[C.SCORE], dtype=np.float32)),
        ],
        schema=TRANSFER_SCHEMA,
    )


def origins_of(gallery: pa.Table, transfer: pa.Table) -> list[str]:
    """The gallery origin of every transfer-set row (a hash join in Arrow, not Python)."""
    rows = pc.index_in(transfer[C.IMAGE_ID], value_set=gallery[C.IMAGE_ID].combine_chunks())
    return gallery[ORIGIN].take(rows).to_pylist()
