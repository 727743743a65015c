"""The distill input's decode actors (``ktray.stages.decode_actors``): how many, how much a
call decodes, how far ahead it runs (through ``ktray.stages.train_data.view_dataset``)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from test_view_dataset import FILES, PER_FILE, _parts

from ktray.config import load_config
from ktray.data import columns as C
from ktray.stages.train_data import describe_targets, view_dataset
from ktray.train.specs import DistillSpec


def _decode_actors() -> set[str]:
    """PIDs of the live Ray Data decode actors of the distillation input (process titles)."""
    import glob

    found = set()
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::MapWorker(MapBatches(ReadDecodeRanges))"):
            found.add(path.split("/")[2])
    return found


def test_a_pool_of_decode_actors_takes_the_cpus_the_trainer_leaves(tmp_path, ray_local):
    """Ranges go to long-lived decode actors, four sent to each (one-off tasks waited ~200 ms
    for Ray Data's scheduler between ranges): as many actors as the free CPUs allow, growing
    into CPUs that free up, or at most ``train.decode_concurrency``."""
    from ktray.stages.common import trainer_cpus
    from ktray.stages.decode_actors import decode_pool

    def spec(*over):  # a call a file: 64 calls, enough for the pool to grow into
        over = [f"out={tmp_path}/o", "train.stripes=1", *over]
        return DistillSpec.from_config(load_config(None, over), "task")

    assert ray.cluster_resources()["CPU"] == 2
    assert decode_pool(spec()) == 2
    assert decode_pool(spec(), trainer_cpus=1.0) == 1
    assert decode_pool(spec(), trainer_cpus=2.0) == 1  # at least one
    assert decode_pool(spec("train.decode_cpus=0.5")) == 4
    assert decode_pool(spec("train.decode_concurrency=3")) == 3
    cfg = load_config(None, [f"out={tmp_path}/o"])
    assert trainer_cpus(cfg) == 0.0  # local mode: the loop runs in the driver
    one = load_config(None, [f"out={tmp_path}/o", "ray.num_workers=1"])
    assert trainer_cpus(one) == 1.0
    two = load_config(None, [f"out={tmp_path}/o", "ray.num_workers=2"])
    assert trainer_cpus(two) == 1.0  # 2 x 0.5: they give up one CPU to decoding

    uri, _ = _parts(tmp_path)
    info = describe_targets(uri, C.LOGITS)

    def actors_seen(spec, trainer_cpus=0.0):
        ds = view_dataset(
            uri, info["columns"], {"x": 8}, spec, seed=0, described=info, trainer_cpus=trainer_cpus
        )
        seen, rows = set(), 0
        for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
            seen |= _decode_actors()
            rows += len(batch[C.LOGITS])
        assert rows == FILES * PER_FILE
        return len(seen)

    assert actors_seen(spec()) == 2
    assert actors_seen(spec("train.decode_concurrency=1")) == 1
    # started with one (the trainer was to hold both CPUs), the pool grows into the CPUs it
    # finds free, as on an autoscaling cluster whose nodes join after the run started
    assert actors_seen(spec(), trainer_cpus=2.0) == 2


def test_large_views_come_in_blocks_of_many_rows(tmp_path, ray_local):
    """A decode actor runs at most two blocks ahead of Ray Data's scheduling loop, so blocks
    of a few large views stalled it (8 MiB blocks: 85 views at 192 px; the actors idled ~40%
    of the time). A block holds ``MIN_BLOCK_ROWS`` views, or the rest of its range."""
    import ktray.stages.decode_actors as td

    assert td.block_bytes({"x": 32}) == td.BLOCK_BYTES  # small views: 8 MiB blocks
    assert td.block_bytes({"x": 224}) == td.MIN_BLOCK_ROWS * 3 * 224 * 224
    _, table = _parts(tmp_path)
    big = pa.concat_tables([table] * 5)  # 640 rows in one file, one row group
    one = tmp_path / "one.parquet"
    pq.write_table(big, one)
    sizes = {"x": 96}  # 27,648 bytes a view: 303 views in 8 MiB; one range of 640 rows
    assert td.task_rows(sizes) > len(big)
    spec = DistillSpec.from_config(load_config(None, [f"out={tmp_path}/out"]), "task")
    ds = view_dataset(str(one), [C.SOURCE, C.LOGITS], sizes, spec, seed=1)
    blocks = [len(b["x"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(blocks) == len(big)
    assert sorted(blocks) == [len(big) - td.MIN_BLOCK_ROWS, td.MIN_BLOCK_ROWS], blocks


def test_small_views_run_further_ahead_of_the_scheduling_loop(tmp_path, ray_local):
    """A decode call holds more blocks of small views ahead of Ray Data's scheduling loop
    (2 by default: at 64 px the actors waited on the loop), 2 of large ones; the dataset
    carries it, and the caller's context is left as it was."""
    import ktray.stages.decode_actors as td

    assert td.DECODE_CALLS_AT_ONCE == 2  # 64 MiB an actor: 4 blocks of 8 MiB a call
    assert td.gen_buffer_blocks({"x": 64}) == 4
    assert td.gen_buffer_blocks({"x": 96}) == 2
    assert td.gen_buffer_blocks({"x": 224}) == 2
    assert td.gen_buffer_blocks({"x": 64, "xt": 224}) == 2
    uri, _ = _parts(tmp_path)
    info = describe_targets(uri, C.LOGITS)
    spec = DistillSpec.from_config(load_config(None, [f"out={tmp_path}/out"]), "task")
    ctx = ray.data.DataContext.get_current()
    before = ctx._max_num_blocks_in_streaming_gen_buffer
    ds = view_dataset(uri, info["columns"], {"x": 64}, spec, seed=0, described=info)
    assert ds.context._max_num_blocks_in_streaming_gen_buffer == 4
    assert ctx._max_num_blocks_in_streaming_gen_buffer == before == 2
    rows = sum(len(b["x"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert rows == info["rows"]
    # two calls side by side in each actor: one's reads overlap the other's decoding
    compute = td.decode_stage(ray, spec, 0.0)["compute"]
    assert compute.max_concurrent_calls_per_actor == td.DECODE_CALLS_AT_ONCE == 2
    assert compute.enable_true_multi_threading
