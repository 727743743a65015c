"""One shard writer for the Ray Data inference passes (teacher logits, crop embeddings).

A pass cuts its rows into shards; each shard is one Ray Data block and ends as one part file
``<dir>/part-NNNNN.parquet``. The pipeline has two stages:

1. **decode** (Ray Data on CPU, ``infer.decode_cpus`` each, ``infer.decode_concurrency`` at
   once at most; a pool of actors, or tasks for a few shards: :mod:`ktray.stages.decode_tasks`):
   a whole shard's images are read in order (sources grouped by file) and decoded, and every
   view or crop is cut and resized to a ``uint8 [S, S, 3]`` array (column ``pixels``;
   unreadable images give one ``ok=False`` row);
2. **model** (an autoscaling actor pool of :class:`ShardWriter` subclasses, ``infer.actors``,
   one GPU per actor when the cluster has GPUs): the actor checks that it got the whole shard,
   normalises the pixels on the device, runs the model (bf16 on GPU) and writes the part file
   atomically (temporary name + rename). Ray does not restart a dead actor: the shards it had
   not finished run again in a new pass (:func:`rows_with_retries`).

:func:`prepare` resumes: a ``spec.json`` beside the parts names what they were made for; parts
made under another spec are dropped, parts of the same spec are kept untouched and only the
missing shards are computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ktray import storage
from ktray.config import Config
from ktray.errors import KtrayError
from ktray.stages.nodes import check_shared_storage
from ktray.stages.timeline import process_start, timeline

log = logging.getLogger("ktray")

SET, SHARD, SHARD_SIZE = "set", "shard", "shard_size"
"""Block columns: the output folder's key, the shard number, the shard's row count."""
OK, PIXELS = "ok", "pixels"
"""Decode-stage columns: readable image, ``uint8 [S, S, 3]`` view (zeros when unreadable)."""
SPEC = "spec.json"


def part_name(shard: int) -> str:
    """``part-NNNNN.parquet``: parts sort in shard order."""
    return f"part-{shard:05d}.parquet"


def list_parts(directory: str) -> list[str]:
    """The part files of ``directory`` in shard order (empty when it does not exist)."""
    fs, path = storage.fs_and_path(directory)
    if not fs.exists(path):
        return []
    names = sorted(os.path.basename(p) for p in fs.ls(path, detail=False))
    return [
        storage.join(directory, n)
        for n in names
        if n.startswith("part-") and n.endswith(".parquet")
    ]


def fingerprint(table: pa.Table, columns: tuple[str, ...]) -> str:
    """A hash of a table's string ``columns``: parts are valid for exactly these rows."""
    digest = hashlib.sha256()
    for col in columns:
        for chunk in table[col].chunks:
            digest.update(b"\0".join(str(s).encode() for s in chunk.to_pylist()))
            digest.update(b"\1")
    return digest.hexdigest()[:16]


def prepare(directory: str, spec: dict, n_shards: int) -> list[int]:
    """Make ``directory`` hold parts of ``spec`` only; return the shards still to compute.

    Parts written under another spec (or with no ``spec.json``: an older layout) are deleted;
    parts of this spec are left untouched (a resumed killed job keeps them).
    """
    spec = json.loads(json.dumps(spec))  # as read back from spec.json (tuples -> lists)
    spec_uri = storage.join(directory, SPEC)
    old = storage.read_json(spec_uri) if storage.exists(spec_uri) else None
    existing = list_parts(directory)
    if old != spec:
        if existing:
            log.info("%s holds parts made under other settings; recomputing them", directory)
        fs = storage.fs_and_path(directory)[0]
        for f in existing:
            fs.rm(storage.fs_and_path(f)[1])
        existing = []
        storage.makedirs(directory)
        storage.write_json(spec_uri, spec)
    have = {os.path.basename(f) for f in existing}
    return [s for s in range(n_shards) if part_name(s) not in have]


def shard_block(rows: pa.Table, name: str, shard: int, shard_rows: int) -> pa.Table:
    """Rows ``[shard * shard_rows, ...)`` of ``rows`` as one block, with the block columns."""
    part = rows.slice(shard * shard_rows, shard_rows)
    n = len(part)
    return part.append_column(SET, pa.array([name] * n, pa.string())).append_column(
        SHARD, pa.array([shard] * n, pa.int32())
    )


def n_shards(rows: int, shard_rows: int) -> int:
    return max(1, math.ceil(rows / shard_rows))


def decoded(columns: dict, pixels: np.ndarray, ok: np.ndarray) -> dict:
    """A decode stage's output batch: ``columns`` + ``ok`` + ``pixels`` (``uint8 [N, S, S,
    3]``) + ``shard_size`` (rows of the shard after decoding, which the writer checks)."""
    out = {k: np.asarray(v) for k, v in columns.items()}
    out[OK] = np.asarray(ok, dtype=bool)
    out[PIXELS] = pixels
    shards = out[SHARD]
    counts = {s: int((shards == s).sum()) for s in set(shards.tolist())}
    out[SHARD_SIZE] = np.asarray([counts[s] for s in shards.tolist()], np.int32)
    return out


class ShardWriter:
    """Ray Data actor base: one part file per shard of each batch, written atomically.

    Subclasses implement :meth:`process` (the model part) and call :meth:`ready` at the end of
    their ``__init__`` (their model loaded). ``out_dirs`` maps a block's ``set`` value to its
    output folder. Each shard's summary row says which actor wrote it and when (wall clock):
    ``actor``, ``spawned`` (its process started), ``born`` (its ``__init__`` began: the
    imports done), ``ready``, ``start``; :func:`timeline` reads them.
    """

    row_group_rows: int | None = None
    """Rows per row group of the part files (None: one group a part)."""

    def __init__(self, out_dirs: dict, threads: int = 0):
        import socket

        import torch

        self.born = self.loaded = time.time()
        self.spawned = process_start() or self.born
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        if threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.out_dirs = out_dirs

    def ready(self) -> None:
        """The model is loaded: the actor's start-up ends here."""
        self.loaded = time.time()

    def process(self, part: dict) -> tuple[pa.Table, int]:
        """One whole shard (a dict of numpy columns) -> (its part table, skipped rows)."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        sets, shards = batch[SET].astype(str), batch[SHARD].astype(np.int64)
        stats: dict[str, list] = {k: [] for k in (SET, SHARD, "rows", "skipped", "seconds")}
        stats.update(actor=[], spawned=[], born=[], ready=[], start=[])
        keys = sorted(set(zip(sets.tolist(), shards.tolist())))
        for name, shard in keys:
            began, start = time.time(), time.perf_counter()
            if len(keys) == 1:  # the usual batch, one whole shard: no copy of its pixels
                part, rows = batch, len(sets)  # (a mask copy took 10-15 ms per 512 views
            else:  # at 224 px, ~25% of a ViT-B/16 forward on them on an H200)
                mask = (sets == name) & (shards == shard)
                part, rows = {k: v[mask] for k, v in batch.items()}, int(mask.sum())
            expected = int(part[SHARD_SIZE][0])
            if rows != expected:  # a split shard would be written partially
                raise RuntimeError(f"{name} shard {shard}: got {rows} of {expected} rows")
            table, skipped = self.process(part)
            uri = storage.join(self.out_dirs[name], part_name(shard))
            storage.write_parquet(uri, table, self.row_group_rows)
            values = (name, shard, len(table), skipped, time.perf_counter() - start)
            values += (self.actor, self.spawned, self.born, self.loaded, began)
            for k, v in zip(stats, values):
                stats[k].append(v)
        return {k: np.asarray(v) for k, v in stats.items()}


def pool_size(cfg: Config, gpus_per_actor: float, cluster_gpus: float) -> int:
    """Model actors at most: ``infer.actors``, or one per GPU of the cluster (at least 1)."""
    if cfg.infer.actors > 0:
        return cfg.infer.actors
    if gpus_per_actor > 0 and cluster_gpus > 0:
        return max(1, int(cluster_gpus // gpus_per_actor))
    return 1


def actor_calls(inf, cluster_gpus: float) -> int:
    """Shards one model actor works on at once (``infer.calls_per_actor``, see there)."""
    if inf.calls_per_actor > 0:
        return inf.calls_per_actor
    return 2 if cluster_gpus > 0 else 1


def actor_threads(inf, cluster_gpus: float, pool: int) -> int:
    """Torch threads of one model actor (``infer.threads_per_actor``, see there)."""
    if cluster_gpus > 0:
        return max(1, int(inf.cpus_per_actor))
    if inf.threads_per_actor > 0:
        return inf.threads_per_actor
    import ray

    node_cpus = max(
        (n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1
    )
    return max(1, int(node_cpus // max(1, pool)))


def inference(
    cfg: Config,
    ds,
    decode,
    decode_kwargs: dict,
    actor,
    actor_kwargs: dict,
    decode_bytes: int,
    batch_size: int | None = None,
    blocks: int = 0,
):
    """``ds`` -> decode on CPU -> an autoscaling pool of model actors (``infer.*``).

    Args:
        decode_bytes: the pixels of one decoded batch (or block) in bytes.
        batch_size: rows per decode call and per actor call; None = one block each.
        blocks: ``ds``'s blocks (few decode in tasks, more in actors: ``decode_stage``).
    """
    import ray

    from ktray.stages.common import ensure_ray

    ensure_ray(cfg.ray)
    check_shared_storage(cfg.ray, cfg.out)  # actors on other nodes write under out
    inf = cfg.infer
    resources = ray.cluster_resources()
    cpus, cluster_gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if inf.cpus_per_actor + inf.decode_cpus > cpus:
        raise KtrayError(
            f"infer.cpus_per_actor + infer.decode_cpus = "
            f"{inf.cpus_per_actor + inf.decode_cpus:g} exceeds the cluster's "
            f"{cpus:g} CPUs (the decode stage would never run)"
        )
    gpus = inf.gpus_per_actor if inf.gpus_per_actor >= 0 else (1.0 if cluster_gpus else 0.0)
    pool = pool_size(cfg, gpus, cluster_gpus)
    from ktray.stages import decode_tasks as dt  # (it imports this module)

    stage = dt.decode_stage(decode, inf, cpus - pool * inf.cpus_per_actor, blocks)
    actors = "compute" in stage  # (else one-off tasks: max_restarts is no option of theirs)
    decoded_ds = (
        functools.partial(map_without_restarts, ds.map_batches) if actors else ds.map_batches
    )(
        stage.pop("fn"),
        fn_kwargs=decode_kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=inf.decode_cpus,
        **stage,
        # What a decode worker holds: its process and a batch of pixels twice (PIL images +
        # array), declared so that Ray places decode workers by real memory. It also keeps a
        # task stage apart: Ray Data fuses a task stage into the next actor stage when their
        # resource requests match (decoding would run serially inside the model actor).
        memory=dt.DECODE_WORKER_BYTES + 2 * decode_bytes,
    )
    # Whole blocks (batch_size None: one shard per call) on GPU actors: Ray's public
    # map_batches refuses GPUs without a batch size, and any row count would split shards
    # across calls. map_batches_internal (a DeveloperAPI, what Ray's own map_groups uses for
    # the same reason) skips only that check.
    map_actor = (
        decoded_ds.map_batches_internal
        if batch_size is None and gpus > 0
        else decoded_ds.map_batches
    )
    calls = actor_calls(inf, cluster_gpus)
    return map_without_restarts(
        map_actor,
        actor,
        fn_constructor_kwargs=dict(actor_kwargs, threads=actor_threads(inf, cluster_gpus, pool)),
        batch_size=batch_size,
        batch_format="numpy",
        # min_size=1: a fixed pool of 1-CPU actors starves the reads on 2 CPUs (hangs)
        compute=ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=pool,
            max_concurrent_calls_per_actor=calls,
            enable_true_multi_threading=calls > 1,
        ),
        num_cpus=inf.cpus_per_actor,
        num_gpus=gpus,
    )


def map_shards(
    cfg: Config,
    blocks: list[pa.Table],
    decode,
    decode_kwargs: dict,
    writer,
    writer_kwargs: dict,
    block_bytes: int,
    describe,
) -> list[dict]:
    """Decode ``blocks`` in CPU tasks, then run ``writer`` (a :class:`ShardWriter`) over them
    on an autoscaling actor pool (:func:`inference`); return one summary row per shard.

    Args:
        cfg: the config (its ``infer`` section sizes both stages).
        blocks: one pyarrow table per shard (:func:`shard_block`).
        decode: ``decode(table, **decode_kwargs) -> dict`` of numpy columns (:func:`decoded`).
        writer: the actor class, built with ``writer_kwargs`` + ``threads``.
        block_bytes: the largest decoded shard in bytes: Ray Data must not split it.
        describe: ``describe(row) -> str`` logged as each shard finishes.
    """
    import ray

    from ktray.stages.common import ensure_ray
    from ktray.train.loop import eta_text  # torch: decode workers import this module

    ensure_ray(cfg.ray)
    ctx = ray.data.DataContext.get_current()
    old_block = ctx.target_max_block_size
    # one shard = one block = one part file: a larger block must not be split on its way
    ctx.target_max_block_size = max(old_block or 0, int(block_bytes * 1.25) + 2**20)

    def run(todo: list[pa.Table]):
        args = (decode, decode_kwargs, writer, writer_kwargs, block_bytes)
        return inference(cfg, ray.data.from_arrow(todo), *args, blocks=len(todo))

    try:
        stats, started, began = [], time.perf_counter(), time.time()
        for row in rows_with_retries(blocks, run, (SET, SHARD)):
            stats.append(row)
            done, left = len(stats), len(blocks) - len(stats)
            elapsed = time.perf_counter() - started
            eta = eta_text(elapsed / done * left) if left else "done"
            log.info("%s  [%d/%d shards, %s]", describe(row), done, len(blocks), eta)
    finally:
        ctx.target_max_block_size = old_block
    if stats:
        log.info("where the time went: %s", timeline(stats, began, time.time()))
    return stats


ACTOR_RETRIES = 3
"""Times :func:`rows_with_retries` runs again the shards whose model actor died."""


def map_without_restarts(map_batches, fn, **kwargs):
    """``map_batches(fn, **kwargs)`` (a Dataset's map method) onto an actor pool whose actors
    Ray never restarts.

    Ray Data restarts a dead actor by default (``max_restarts=-1``), but it hands every actor
    its constructor arguments (the map function and the DataContext) through the object store,
    and Ray core then logs an ERROR line for each restartable actor it creates
    (ray-project/ray#57733, #53727), whatever the arguments' size. Without restarts there is
    no such line; a dead actor fails only its own shards, which :func:`rows_with_retries` runs
    again. Ray 2.60 takes ``max_restarts`` only as an extra remote arg, which it marks
    deprecated (removed in 2.64): that warning is silenced here, for this call alone.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return map_batches(fn, max_restarts=0, **kwargs)


def rows_with_retries(blocks: list[pa.Table], run, key: tuple[str, ...]) -> Iterator[dict]:
    """The summary rows of ``run(blocks)`` (a Ray Data pass over model actors with one row per
    shard, ``key`` naming its columns in both the blocks and the rows), as Python values.

    When a model actor dies (an out-of-memory kill, a lost node: the actors are not restarted,
    see :func:`map_without_restarts`), the blocks with no row yet run again in a new pass, up to
    :data:`ACTOR_RETRIES` times; the parts already written are kept.
    """
    import ray

    todo = list(blocks)
    for attempt in range(ACTOR_RETRIES + 1):
        done = set()
        try:
            for row in run(todo).iter_rows():
                row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                done.add(tuple(row[k] for k in key))
                yield row
            return
        except ray.exceptions.RayActorError as e:
            todo = [b for b in todo if tuple(b[k][0].as_py() for k in key) not in done]
            if not todo:
                return
            if attempt == ACTOR_RETRIES:
                raise
            log.warning(
                "a model actor died (%s); running its %d unfinished shards again",
                type(e).__name__,
                len(todo),
            )
