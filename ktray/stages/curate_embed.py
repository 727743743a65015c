"""The curate stage's embedding pass (Ray Data, :mod:`ktray.stages.shards`): the three image
sets (``queries``, ``protected``, ``gallery``) cut into shards, decoded to crops on CPU and
embedded by an actor pool of :class:`EmbedWriter` into
``OUT/curate/embeddings/<set>/part-NNNNN.parquet``; then the vectors read back."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import storage
from ktray.config import Config
from ktray.data import columns as C
from ktray.errors import KtrayError
from ktray.retrieval.embed import (
    EMBEDDING_DTYPE,
    GALLERY_INDEX,
    Embedder,
    EncoderSpec,
    vectors,
)
from ktray.retrieval.select import map_dtype
from ktray.stages import decode_tasks, shards

log = logging.getLogger("ktray")
SETS = ("queries", "protected", "gallery")


class EmbedWriter(shards.ShardWriter):
    """Ray Data actor: embeds the decoded crops of one shard and writes its part file."""

    def __init__(self, encoder: dict, out_dirs: dict, batch_size: int, threads: int = 0):
        super().__init__(out_dirs, threads)
        self.embedder = Embedder(EncoderSpec(**encoder), batch_size=batch_size)
        self.ready()

    def process(self, part: dict) -> tuple[pa.Table, int]:
        return self.embedder.table(part, part[shards.PIXELS], part[shards.OK])


def embed_sets(cfg: Config, encoder: EncoderSpec, sets: dict, out: str, files: dict):
    """Embed the shards of ``sets`` (``name -> (indexed table, CropScheme)``) not yet on disk
    under ``out/embeddings/<set>``; returns ``(dirs, shard stats, shards per set, shards
    computed)``. ``files``: each set's input identity (a listing fingerprint): parts made from
    files since replaced under the same names are embedded again."""
    cur = cfg.curate
    dirs = {name: storage.join(out, "embeddings", name) for name in SETS}
    blocks, n_shards = [], {}
    for name, (table, scheme) in sets.items():
        spec = {
            "encoder": encoder.as_dict(),
            "scheme": scheme.as_dict(),
            "shard_rows": cur.shard_rows,
            "dtype": EMBEDDING_DTYPE,
            "images": shards.fingerprint(table, (C.IMAGE_ID, C.SOURCE)),
            "files": files[name],
        }
        n_shards[name] = math.ceil(len(table) / cur.shard_rows)
        pending = shards.prepare(dirs[name], spec, n_shards[name])
        blocks += [embed_block(table, name, s, cur.shard_rows) for s in pending]
    log.info(
        "curate: %d queries, %d protected, %d gallery images; %d shards to embed",
        *(len(sets[n][0]) for n in SETS),
        len(blocks),
    )
    stats = (
        embed_shards(
            cfg,
            encoder,
            {n: s.as_dict() for n, (_, s) in sets.items()},
            dirs,
            blocks,
            sets["queries"][1].crops_per_image(),
        )
        if blocks
        else []
    )
    return dirs, stats, n_shards, len(blocks)


def protected_embeddings(
    q: pa.Table, query_vecs: np.ndarray, p: pa.Table | None, protected: pa.Table, crops: bool
):
    """What must not leak: the query images' embeddings (every crop with ``crops``
    (``curate.protect_crops``), else the full-image ones) + the ``protected`` set's (val +
    test); returns ``(vectors [P, D], their image ids)``."""
    full = np.array([b == (0.0, 0.0, 1.0, 1.0) for b in zip(*(q[k].to_pylist() for k in C.BOX))])
    protected_vecs = query_vecs if crops else query_vecs[full]
    qids = np.asarray(q[C.IMAGE_ID].to_pylist(), dtype=object)
    protected_ids = list(qids if crops else qids[full])
    if p is not None:
        protected_vecs = np.concatenate([protected_vecs, vectors(p)])
        pid = protected[C.IMAGE_ID].take(p[GALLERY_INDEX].combine_chunks())
        protected_ids += pid.to_pylist()
    return protected_vecs, protected_ids


def read_embeddings(dirs: dict, sets: dict):
    """Query rows, protected vectors, gallery part files and their vectors' image ids."""
    q = storage.read_parquet(dirs["queries"], columns=[C.IMAGE_ID, *C.BOX, C.EMBEDDING])
    p = (
        storage.read_parquet(dirs["protected"], columns=[GALLERY_INDEX, C.EMBEDDING])
        if len(sets["protected"][0])
        else None
    )
    parts = shards.list_parts(dirs["gallery"])
    # int32 ids while the gallery has < 2^31 images (each part cast before the concatenation:
    # no int64 copy of the whole map)
    dtype = map_dtype(len(sets["gallery"][0]))
    image_of_vector = np.concatenate(
        [_read_part(f, GALLERY_INDEX)[GALLERY_INDEX].to_numpy().astype(dtype) for f in parts]
        or [np.zeros(0, dtype)]
    )
    crops = {
        "queries": len(q),
        "protected": len(p) if p is not None else 0,
        "gallery": len(image_of_vector),
    }
    readable = {
        "queries": len(set(q[C.IMAGE_ID].to_pylist())),
        "protected": len(np.unique(p[GALLERY_INDEX].to_numpy())) if p is not None else 0,
        "gallery": len(np.unique(image_of_vector)),
    }
    skipped = {n: len(sets[n][0]) - readable[n] for n in SETS}
    for what, name in (("gallery", "gallery"), ("query", "queries")):
        if not crops[name]:
            raise KtrayError(
                f"no readable {what} images: all {len(sets[name][0])} were skipped as unreadable"
            )
    return q, p, parts, image_of_vector, crops, skipped


def embed_block(table: pa.Table, name: str, shard: int, shard_rows: int) -> pa.Table:
    return shards.shard_block(
        table.select([GALLERY_INDEX, C.IMAGE_ID, C.SOURCE]), name, shard, shard_rows
    )


def embed_shards(
    cfg: Config,
    encoder: EncoderSpec,
    schemes: dict,
    dirs: dict,
    blocks: list[pa.Table],
    crops_per_image: int,
) -> list[dict]:
    size = encoder.img_size
    return shards.map_shards(
        cfg,
        blocks,
        decode_tasks.embedding_crops,
        {"schemes": schemes, "size": size},
        EmbedWriter,
        {"encoder": encoder.as_dict(), "out_dirs": dirs, "batch_size": cfg.curate.batch_size},
        block_bytes=cfg.curate.shard_rows * max(1, crops_per_image) * size * size * 3,
        describe=lambda r: (
            f"curate: {r['set']} shard {r['shard']} embedded ({r['rows']} "
            f"crops, {r['skipped']} skipped, {r['seconds']:.1f}s)"
        ),
    )


def _read_part(uri: str, column: str) -> pa.Table:
    fs, path = storage.fs_and_path(uri)
    return pq.read_table(path, columns=[column], filesystem=fs)
