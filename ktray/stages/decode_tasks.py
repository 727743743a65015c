"""The CPU decode stage of the Ray Data inference passes (teacher logits, crop embeddings,
evaluation, ``ktray predict``): its functions, one shard (or block) of rows -> ``uint8`` pixels
+ the columns the model actors need (:func:`ktray.stages.shards.decoded`), the actor that runs
them (:class:`DecodeCalls`) and how the stage runs (:func:`decode_stage`).

Ray pickles these functions by reference, so a decode worker imports this module and what it
imports: nothing here, nor in those modules, imports torch (``tests/test_imports.py``). A decode
worker that imported torch with the stage modules paid ~1.3 s of CPU before its first image
and held ~880 MiB resident against ~400 MiB without it (this project's 2-core machine).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ktray.data import columns as C
from ktray.data.decode import VIEW_COLUMNS, decode_full, decode_labeled, decode_views
from ktray.retrieval.crops import CropScheme, decode_crops
from ktray.stages import shards


def logits_views(block: pa.Table, size: int) -> dict:
    """Logits pass: one shard's views as ``uint8 [N, size, size, 3]``."""
    pixels, ok = decode_views(block, size)
    cols = {
        k: block[k].to_numpy(zero_copy_only=False)
        for k in (*VIEW_COLUMNS, shards.SET, shards.SHARD)
    }
    return shards.decoded(cols, pixels, ok)


def crop_scheme(d: dict) -> CropScheme:
    """A :class:`CropScheme` from its ``as_dict`` form."""
    return CropScheme(**dict(d, scales=tuple(d["scales"])))


def embedding_crops(block: pa.Table, schemes: dict, size: int) -> dict:
    """Embedding pass: one shard's crops as ``uint8 [N, size, size, 3]``."""
    name = block[shards.SET][0].as_py()
    cols, pixels, ok = decode_crops(block, crop_scheme(schemes[name]), size)
    n = len(ok)
    cols[shards.SET] = [name] * n
    cols[shards.SHARD] = [block[shards.SHARD][0].as_py()] * n
    return shards.decoded(cols, pixels, ok)


def labeled_images(rows: pa.Table, size: int) -> dict:
    """Evaluation: a block of labeled rows as full-image ``uint8`` views + labels."""
    pixels, labels, ok = decode_labeled(rows, size)
    return {shards.PIXELS: pixels, C.LABEL: labels, shards.OK: np.asarray(ok, bool)}


WIDTH, HEIGHT = "width", "height"
"""Columns of :func:`full_images`: each image's own size (a segmentation mask is resized to it)."""


def full_images(block: pa.Table, size: int) -> dict:
    """Batch prediction: one shard's images as full-image ``uint8 [N, size, size, 3]`` views,
    with each image's own width and height."""
    pixels, ok, sizes = decode_full(block, size)
    cols = {
        k: block[k].to_numpy(zero_copy_only=False)
        for k in (C.IMAGE_ID, C.SOURCE, shards.SET, shards.SHARD)
    }
    cols[WIDTH], cols[HEIGHT] = sizes[:, 0], sizes[:, 1]
    return shards.decoded(cols, pixels, ok)


class DecodeCalls:
    """A decode actor of an inference pass: ``fn(block, **kwargs)`` for each block it gets
    (``fn`` one of this module's functions; ``kwargs`` come with each call)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, block: pa.Table, **kwargs) -> dict:
        return self.fn(block, **kwargs)


DECODE_WORKER_BYTES = 384 * 2**20
"""Resident memory of a decode actor's process, its batch aside (Python, numpy, PIL, pyarrow,
Ray and this module's imports, no torch): 310 MiB for a decode task at its peak in
``benchmarks/logits_bench.py`` (500-view shards at 96 px), 964 MiB when the decode modules
imported torch (an earlier release declared 768 MiB)."""


DECODE_TASKS_IN_FLIGHT = 2
"""Shards (blocks) sent to one decode actor at once: the one it decodes and the next, queued,
so it starts the moment one is done. As one-off Ray tasks, each shard waits for Ray Data's
scheduling loop to see the last one finish: ``benchmarks/infer_input_bench.py`` (2,048-view
shards at 64 px, a no-op model actor, the 2-core machine, 3 passes each) delivered 0.67-0.71
of the bare decode rate as tasks, 0.67-0.77 as actors sent one shard at a time, 0.89-0.90
sent 2 and 0.84-0.91 sent 4; at 224 px (1.7 s a shard) 0.85-0.96 as tasks, 0.94-1.00 as
actors sent 2."""

TASK_SHARDS_PER_SLOT = 24
"""A pass of at most this many blocks per decode slot decodes in one-off tasks: the decode
actors' start-up (their first shard done ~2 s later on the 2-core machine) costs more than
the waits between tasks save. ``infer_input_bench`` (64 px, 2 slots, whole-pass ratios):
8 shards a slot 0.34-0.41 as actors, 0.34-0.43 as tasks; 16: 0.46-0.53 and 0.48-0.59; 24:
0.57-0.59 and 0.52-0.59; 49: 0.65-0.68 and 0.55-0.63 (wall 23.7-24.9 s against 26.1-29.3
s)."""


def decode_stage(decode, inf, free_cpus: float, blocks: int) -> dict:
    """``map_batches`` arguments of an inference pass's decode stage (``decode`` its function,
    ``infer.decode_cpus`` each): ``infer.decode_concurrency`` slots, or as many as
    ``free_cpus`` (the cluster's CPUs less the model actors') allow. A pass of more than
    ``TASK_SHARDS_PER_SLOT`` blocks a slot runs on a pool of actors (:class:`DecodeCalls`)
    growing as nodes join, each sent ``DECODE_TASKS_IN_FLIGHT`` blocks (Ray Data grows a pool
    whose actors have 1.75 x the calls they run at once queued: 2 keeps that); a smaller one
    in one-off tasks."""
    import ray

    slots = inf.decode_concurrency or max(1, int(free_cpus // inf.decode_cpus))
    if blocks <= TASK_SHARDS_PER_SLOT * slots:
        return dict(fn=decode, concurrency=inf.decode_concurrency or None)
    return dict(
        fn=DecodeCalls,
        fn_constructor_args=(decode,),
        compute=ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=inf.decode_concurrency or None,
            initial_size=slots,
            max_tasks_in_flight_per_actor=DECODE_TASKS_IN_FLIGHT,
        ),
    )
