"""The distill input's decode actors: how much a call decodes, how far ahead it runs, how many.

The sizes of the work (:func:`task_rows`: rows a decode call; :func:`block_bytes`: Ray Data's
output blocks; :func:`gen_buffer_blocks`: blocks a call holds ahead of Ray Data's scheduling
loop) and the actor pool (:func:`decode_pool`, :func:`decode_stage`) of
:func:`ktray.stages.train_data.view_dataset`, each with what was measured to choose it.
"""

from __future__ import annotations

from ktray.train.specs import DistillSpec

BLOCK_ROWS = 4096
"""Rows per decode call at most: a range of a Parquet view table, or a block of an in-memory
one (online runs); fewer for large views (:func:`task_rows`)."""
TASK_BYTES = 64 * 2**20
"""Decoded bytes per range at most: 4,096 views at 64 px, 445 at 224 px (a 4,096-row
task at 224 px would put 600 MB of views into the object store at once; on a 16 GiB node
Ray's object store is ~5 GB, so few such tasks could run side by side)."""
MIN_TASK_ROWS = 256


def task_rows(sizes: dict[str, int]) -> int:
    """Rows per decode task for views of ``sizes`` (uint8 pixels at each size)."""
    per_row = sum(3 * s * s for s in sizes.values())
    return max(MIN_TASK_ROWS, min(BLOCK_ROWS, TASK_BYTES // max(1, per_row)))


BLOCK_BYTES = 8 * 2**20
"""Target block size of this dataset for small views (Ray's default is 128 MiB): small blocks
reach the trainer as soon as they are decoded (a 128 MiB block of decoded views is ~10k images
decoded before the first batch), shuffle at a finer grain, and bound what is in flight."""
MIN_BLOCK_ROWS = 512
"""Rows a block holds at least (or its range's rest): larger views get larger blocks. A decode
actor runs at most two blocks ahead of Ray Data's scheduling loop, which takes a task's new
blocks once a turn (~75 ms on the 2-core machine), so blocks of a few rows stall the actors:
with 8 MiB blocks at 192 px (85 rows each) the two actors there were busy ~60% of the time
and a loop reading the dataset got 1,584-1,779 img/s; with blocks of a range or 512 rows,
2,566-2,719 (the two cores' bare rate ~3,100)."""


def block_bytes(sizes: dict[str, int]) -> int:
    """Ray Data's target block size for views of ``sizes``: ``BLOCK_BYTES``, or
    ``MIN_BLOCK_ROWS`` rows of views when that is more."""
    return max(BLOCK_BYTES, MIN_BLOCK_ROWS * sum(3 * s * s for s in sizes.values()))


GEN_BUFFER_BYTES = 64 * 2**20
"""Decoded blocks a decode call may hold ahead of Ray Data's scheduling loop, in bytes
(:func:`gen_buffer_blocks`)."""


def gen_buffer_blocks(sizes: dict[str, int]) -> int:
    """Blocks a decode call runs ahead of the scheduling loop that takes them (Ray Data's
    ``_max_num_blocks_in_streaming_gen_buffer``, 2 by default; counted in its object-store
    budget): ``GEN_BUFFER_BYTES`` of blocks an actor (``DECODE_CALLS_AT_ONCE`` calls), 2 to 8
    a call. Small views decode a block in ~90 ms, about one turn of the loop on a busy node, so
    with 2 an actor waited on the loop: at 64 px on the 2-core machine, one call at a time, 8
    gave 1.06x the img/s of 2 (9 runs each, alternated; input_bench ratio 0.75 -> 0.81), 4
    1.03x. Large views take longer a block and keep 2."""
    per_call = GEN_BUFFER_BYTES // DECODE_CALLS_AT_ONCE
    return max(2, min(8, per_call // block_bytes(sizes)))


DECODE_CALLS_AT_ONCE = 2
"""Ranges a decode actor runs side by side (threads; its CPU budget is unchanged): one's reads
of its stripes, a few round trips on s3 before its first row decodes, overlap the other's
decoding. Measured with ``benchmarks/s3_input_bench.py`` (50 ms round trips): 0.71 of the
same table's rate from local disk one at a time, 0.79 two at a time; from local disk no
change (``input_bench``)."""

DECODE_TASKS_IN_FLIGHT = 2 * DECODE_CALLS_AT_ONCE
"""Ranges sent to one decode actor at once: those it runs and as many queued, so the next
starts the moment one is done. (As one-off tasks, each range waited ~200 ms for Ray Data's
scheduling loop, 10-100 ms a turn, to see the last one finish and send it: on this 2-core
machine the two decode processes were busy ~68% of the time at 2,048 rows a range and
delivered 5,400-5,800 img/s to a loop reading the dataset; as two actors, 7,200.) Ray Data
grows the pool when an actor's ranges reach 1.75 x the calls it runs at once: 2 x keeps
that."""


def decode_pool(spec: DistillSpec, trainer_cpus: float = 0.0) -> int:
    """Decode actors to start with: ``train.decode_concurrency``, or as many as the cluster's
    CPUs less the training workers' hold (``trainer_cpus``) allow at ``train.decode_cpus``
    each, at least one."""
    if spec.decode_concurrency:
        return spec.decode_concurrency
    import ray

    free = ray.cluster_resources().get("CPU", 0) - trainer_cpus
    return max(1, int(free // spec.decode_cpus))


def decode_stage(ray, spec: DistillSpec, trainer_cpus: float) -> dict:
    """``map_batches`` keywords of the decode stage: a pool of CPU actors started with
    :func:`decode_pool` actors, ``DECODE_CALLS_AT_ONCE`` ranges running on each and
    ``DECODE_TASKS_IN_FLIGHT`` sent to it. Without
    ``train.decode_concurrency`` the pool has no upper bound: Ray Data grows it within the
    CPUs its budget sees free, so on an autoscaling cluster the nodes that join for the
    training workers decode too (a pool capped at the start would keep a head node's few
    decode actors for the whole run). Ray does not restart the actors
    (:func:`ktray.stages.shards.map_without_restarts`: a restartable Ray Data actor costs an
    ERROR line in the log each time one starts): a decode actor that dies fails the epoch's
    input, and a run with Ray Train workers resumes from its last checkpoint
    (``ray.max_failures``, ``train.checkpoint_every``)."""
    return dict(
        batch_format="pyarrow",
        num_cpus=spec.decode_cpus,
        compute=ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=spec.decode_concurrency or None,
            initial_size=decode_pool(spec, trainer_cpus),
            max_tasks_in_flight_per_actor=DECODE_TASKS_IN_FLIGHT,
            max_concurrent_calls_per_actor=DECODE_CALLS_AT_ONCE,
            enable_true_multi_threading=True,
        ),
    )
