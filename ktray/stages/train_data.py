"""Distillation input through Ray Data: view rows -> decoded uint8 views + targets.

``view_dataset`` cuts a table of views (the logits stage's parts, a ``distill.targets`` table)
into stripes of consecutive rows from its Parquet footers (:mod:`ktray.data.row_ranges`),
groups them ``train.stripes`` to a decode call (at most ``BLOCK_ROWS`` rows or ``TASK_BYTES``
of decoded views a call) anew every pass, from places all over the table, so a table sorted
by class still gives mixed batches (the passes a run needs come in one execution: one actor
pool), and sends each call to a pool of CPU decode actors (``train.decode_cpus`` each,
starting with as many as the CPUs the training workers leave and growing into CPUs that free
up, at most ``train.decode_concurrency`` when set; two calls running side by side on each,
one's reads overlapping the other's decoding, and two queued, so none waits between calls)
that read its stripes, interleave them and decode + crop their views,
``train.decode_batch`` rows at a time. Rows, not bytes, cut the
work: Ray Data's Parquet reader coalesces files into 8 MiB blocks, ~80k rows of a 10-class
table, which one task on one core decoded. Nothing but the range list is read before the first
batch, and the object store holds the decoded blocks in flight, not the transfer set.
(``randomize_block_order`` after a read, an earlier release's shuffle, is a barrier in Ray Data:
every block of the table went into the object store before the first batch, 2 GiB at 1M rows of
1,000 float16 logits.) Only the columns the run needs are read: source, box, flip and the one target
column (logits for the task objective, features for the features objective, none online); the views
of an online run come as an in-memory table, put in the object store once and cut into ranges of
the same size, decoded by the same actor pool (:class:`DecodeSlices`).
``TorchTrainer(datasets={"train": ds})`` splits it over the workers, which consume it with
``iter_torch_batches`` (local shuffle buffer, prefetching): a worker holds the blocks in flight,
never the transfer set.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import storage
from ktray.data import columns as C
from ktray.data.decode import DecodeViews
from ktray.data.row_ranges import (
    Groups,
    ReadDecodeRanges,
    call_items,
    decode_mixed,
    footers,
    parquet_group_rows,
    read_range,
    row_ranges,
    stripe_rows,
)
from ktray.errors import KtrayError
from ktray.stages.decode_actors import block_bytes, decode_stage, gen_buffer_blocks, task_rows
from ktray.stages.shards import map_without_restarts
from ktray.train.specs import DistillSpec


def parquet_files(uri: str) -> list[str]:
    """The ``.parquet`` files of a file or folder URI, in name order."""
    fs, path = storage.fs_and_path(uri)
    if fs.isfile(path):
        return [uri]
    found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [prefix + p for p in found]


def describe_targets(uri: str, target: str | None) -> dict:
    """Check a view table against the logits contract and measure it: ``{"files", "rows",
    "columns", "feature_dim", "target_width"}`` (values per row of the target column).
    ``"footers"`` holds the files' row groups (:class:`ktray.data.row_ranges.Groups`, from
    their Parquet footers), for :func:`view_dataset` to cut the table without reading them
    again. Raises KtrayError naming a missing column, or on a
    table without rows."""
    files = parquet_files(uri)
    if not files:
        raise KtrayError(f"no .parquet files at {uri}")
    metas = footers(files)
    rows, schema = sum(m.num_rows for m in metas), _schema(files[0])
    if not rows:
        raise KtrayError(f"targets table {uri} has no rows")
    needed = [C.IMAGE_ID, C.SOURCE] + ([target] if target else [])
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise KtrayError(
            f"targets table {uri} lacks column(s) {', '.join(missing)} (needs "
            "image_id, source, optional x0, y0, x1, y1, flip, and logits / "
            "features)"
        )
    if (
        target
        and not pa.types.is_list(schema.field(target).type)
        and not pa.types.is_fixed_size_list(schema.field(target).type)
    ):
        raise KtrayError(f"targets table {uri}: column {target} must be a list of floats")
    width = 0  # values per row of the target column
    if target and pa.types.is_fixed_size_list(schema.field(target).type):
        width = schema.field(target).type.list_size
    elif target:  # a variable list: its first row's length
        first = next(f for f, m in zip(files, metas) if m.num_rows)
        fs, path = storage.fs_and_path(first)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            g = next(i for i in range(pf.num_row_groups) if pf.metadata.row_group(i).num_rows)
            width = len(pf.read_row_group(g, columns=[target]).column(0)[0].as_py())
    columns = [C.SOURCE] + [c for c in (*C.BOX, C.FLIP) if c in schema.names]
    return {
        "files": files,
        "rows": rows,
        "columns": columns + ([target] if target else []),
        "feature_dim": width if target == C.FEATURES else 0,
        "target_width": width,
        "footers": metas,
    }


MAX_PASS_RANGES = 2048
"""Ranges one execution of a streamed input holds at most (:func:`passes_for`): the driver
makes a block of each (``ray.data.from_items``: 1.6 s for 2,048 here, 6 s for 8,192)."""


def passes_for(steps: int, batch_size: int, rows: int, ranges: int = 1) -> tuple[int, bool]:
    """``(passes, whole)``: the passes over a table of ``rows`` rows (``ranges`` ranges) one
    execution makes, and whether they are all that ``steps`` batches of ``batch_size`` (global)
    take. Whole when they fit ``MAX_PASS_RANGES``; else as many passes as fit (at least one),
    and the loop starts another execution when they are done."""
    needed = -(-max(1, steps) * max(1, batch_size) // max(1, rows))
    fit = max(1, MAX_PASS_RANGES // max(1, ranges))
    return min(needed, fit), needed <= fit


def decoded_mib(rows: int, sizes: dict[str, int], target_dim: int = 0) -> float:
    """MiB of a transfer set's decoded views: uint8 pixels at each size + float16 targets."""
    return rows * (sum(3 * s * s for s in sizes.values()) + 2 * target_dim) / 2**20


def view_dataset(
    source: str | pa.Table,
    columns: list[str],
    sizes: dict[str, int],
    spec: DistillSpec,
    seed: int | None = None,
    rows: int = 0,
    target_dim: int = 0,
    trainer_cpus: float = 0.0,
    described: dict | None = None,
    steps: int = 0,
):
    """The Ray Data dataset of decoded views (``x`` [+ ``xt``] uint8 NHWC, + the target).

    ``seed`` fixes the file and block order of every epoch (each epoch its own); with
    ``spec.reproducible`` the blocks also leave in that order (``preserve_order``, kept by
    :func:`ktray.stages.common.fit`), so a seeded run's batches are the same every time.

    A set whose decoded views take less than ``spec.cache_decoded_mb`` (``rows`` and
    ``target_dim`` give its size) is decoded once and materialised in the object store, so
    its many epochs re-read memory instead of re-decoding; a larger one streams, and so does
    a run on fresh views (``distill.augment=consistent``: new random views every epoch).

    ``trainer_cpus``: the CPUs the training workers hold (:func:`ktray.stages.common.
    trainer_cpus`); the decode actors get the rest
    (:func:`ktray.stages.decode_actors.decode_pool`). ``described``: what
    :func:`describe_targets` said of a Parquet ``source`` (its files and footers, not read
    again).

    ``steps``: the optimizer steps the run takes (of ``spec.batch_size`` rows). A streamed
    table (Parquet or in memory) then runs all the passes they need in one execution
    (:func:`passes_for`; its attribute ``passes`` says how many an execution makes): each pass
    every stripe once, in calls of its own seeded draw (:func:`ktray.data.row_ranges.
    call_items`: ``train.stripes`` places a call, shuffled together), with one pool of decode
    actors for the run (a new pool for each pass took ~2 s to start its first batch here,
    ~5.5 s under a Ray Train worker). When they do not fit one execution's range list
    (``MAX_PASS_RANGES``), or without ``steps``, every execution takes as many passes as fit,
    their ranges in a new order each execution (reseeded per execution from ``seed``: a seeded
    run is reproducible, and its epochs are not one order repeated)."""
    import ray

    ordered = spec.reproducible and seed is not None
    ctx = ray.data.DataContext.get_current()
    saved = (
        ctx.target_max_block_size,
        ctx.execution_options,
        ctx._max_num_blocks_in_streaming_gen_buffer,
    )
    ctx.target_max_block_size = block_bytes(sizes)
    ctx._max_num_blocks_in_streaming_gen_buffer = gen_buffer_blocks(sizes)
    if ordered:  # blocks leave in the (seeded) order of their inputs, not as decoded
        ctx.execution_options = copy.copy(ctx.execution_options)
        ctx.execution_options.preserve_order = True
    fresh = spec.augment == "consistent"  # new views every epoch: nothing to cache
    cached = not fresh and rows and decoded_mib(rows, sizes, target_dim) < spec.cache_decoded_mb
    try:  # a Dataset keeps a copy of the context it was made under
        ds, passes = _view_dataset(
            ray, source, columns, sizes, spec, seed, trainer_cpus, described, 0 if cached else steps
        )
        if cached:  # decoded once; each execution (epoch) re-reads it in a new block order
            ds, passes = ds.materialize().randomize_block_order(seed=_epoch_seed(ray, seed)), 1
        ds.passes = passes
        return ds
    finally:
        (
            ctx.target_max_block_size,
            ctx.execution_options,
            ctx._max_num_blocks_in_streaming_gen_buffer,
        ) = saved


def _epoch_seed(ray, seed: int | None):
    """A block-order seed that differs every epoch (execution) and is fixed by ``seed``
    (a plain int would give every epoch the same order)."""
    if seed is None:
        return None
    return ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)


def _view_dataset(ray, source, columns, sizes, spec, seed, trainer_cpus, described, steps):
    """The decoded view dataset and the passes over ``source`` one execution of it makes."""
    target = [c for c in columns if c in (C.LOGITS, C.FEATURES)]
    fresh = (spec.scale_min, 1.0) if spec.augment == "consistent" else None
    decode = DecodeViews(sizes, target, fresh)
    task = task_rows(sizes)
    if isinstance(source, pa.Table):  # in memory (an online run's views): slices of it
        table = source.select(columns)
        rows = stripe_rows(task, spec.stripes, [_image_group_rows(table.slice(0, task))])
        stripes = [
            {"start": i, "rows": min(rows, table.num_rows - i)}
            for i in range(0, table.num_rows, rows)
        ]
        # one copy in the object store, read zero-copy by every decode actor
        reader = (DecodeSlices, (ray.put(table), decode, spec.decode_batch))
        what = "the transfer set"
    else:
        # A Parquet table: one decode call per ~task_rows rows, read as stripes (cut from the
        # footers) from several places of the table. The actors read the rows themselves:
        # nothing but the stripe list (a few KB) and one call's sources are read before the
        # first batch, and the object store holds decoded blocks in flight, not the table.
        # (Ray Data's Parquet reader cuts blocks by bytes, 8 MiB here: ~80k rows of a 10-class
        # table, one task on one core for them; its streaming repartition by rows let the read
        # run ahead into the object store, 2 GiB at 1M rows; ``randomize_block_order`` after a
        # read is a barrier that reads the whole table.)
        if described is not None:
            files, metas = described["files"], described["footers"]
        else:
            files = parquet_files(source)
            metas = footers(files)
        stripes = []
        if any(m.num_rows for m in metas):
            first = row_ranges(files, task, metas)[0]
            units = [
                _table_group_rows(metas, task),
                _image_group_rows(read_range(first, [C.SOURCE])),
            ]
            rows = stripe_rows(task, spec.stripes, units)
            stripes = row_ranges(files, rows, metas)
        reader = (ReadDecodeRanges, (columns, decode, spec.decode_batch))
        what = f"the view table {source}"
    if not stripes:
        raise KtrayError(f"{what} has no rows")
    per_call = min(spec.stripes, max(1, task // rows))  # (small files give shorter stripes)
    calls = -(-len(stripes) // per_call)
    # All the run's passes in one execution (one decode actor pool) when they fit, each pass
    # in its own seeded order; else as many as fit, an execution at a time.
    passes, whole = (
        passes_for(steps, spec.batch_size, sum(r["rows"] for r in stripes), calls)
        if steps
        else (1, False)
    )
    if whole:  # one execution: each pass every stripe once, in its own seeded calls
        items = call_items(stripes, per_call, passes, seed)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
    else:
        # More executions follow (a set of thousands of calls, 10M rows = ~5,000): each
        # takes its passes' calls in a new order, reseeded every execution (a seeded order
        # fixed in the driver would make every execution's batches the same).
        items = call_items(stripes, per_call, 1, seed) * passes
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.randomize_block_order(seed=_epoch_seed(ray, seed))
    ds = map_without_restarts(
        ds.map_batches,
        reader[0],
        fn_constructor_args=reader[1],
        batch_size=1,
        **decode_stage(ray, spec, trainer_cpus),
    )
    return ds, passes


def _schema(uri: str) -> pa.Schema:
    fs, path = storage.fs_and_path(uri)
    with fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).schema_arrow


def _table_group_rows(metas: list[Groups], task: int) -> int:
    """The view table's usual rows per row group (the median), at most ``task``: a table of
    groups larger than a call is read a call's piece at a time, one place a call (stripes of
    it would re-read a group once per stripe)."""
    groups = np.concatenate([m.rows for m in metas]) if metas else np.zeros(0, np.int64)
    groups = groups[groups > 0]
    return min(task, int(np.median(groups))) if len(groups) else 0


def _image_group_rows(rows: pa.Table) -> int:
    """The fewest rows of a stripe over the Parquet image files behind ``rows`` (a sample: one
    call's rows): two of their row groups, in view rows (times the rows per image in the
    sample: an image's views are adjacent rows). 0 when the images are files, tar members or
    IDX rows."""
    sources = rows.column(C.SOURCE).to_pylist()
    group = parquet_group_rows(sources)
    if not group:
        return 0
    # twice: a stripe starting mid-group reads at most 1.5x the images it uses (one: 2x)
    return -(-2 * group * len(sources) // max(1, len(set(sources))))


class DecodeSlices:
    """Ranges ``{"start", "rows"}`` of an in-memory table (an online run's views, put in the
    object store once) -> decoded views, ``batch_rows`` rows per output: what
    :class:`ktray.data.row_ranges.ReadDecodeRanges` is to a Parquet table."""

    def __init__(self, table_ref, decode, batch_rows: int):
        import ray

        self.table = ray.get(table_ref)
        self.decode = decode
        self.batch_rows = int(batch_rows)

    def __call__(self, batch: pa.Table):
        for item in batch.to_pylist():
            parts = (self.table.slice(r["start"], r["rows"]) for r in item["parts"])
            yield from decode_mixed(parts, self.decode, self.batch_rows, item["seed"])
