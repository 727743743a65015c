"""The shard writer of the inference passes (ktray.stages.shards), through the logits stage:
a killed job resumes without touching finished parts, and parts made under other settings are
never reused."""

import logging
import os

import pyarrow.parquet as pq

from ktray import storage
from ktray.config import load_config
from ktray.stages import logits as logits_stage
from ktray.stages import shards, timeline


def _cfg(task, out, *extra):
    return load_config("tiny", [f"data.root={task}", f"out={out}", "tracking.mlflow=false", *extra])


def _stats(d: str) -> dict:
    return {
        f: (os.stat(os.path.join(d, f)).st_ino, os.stat(os.path.join(d, f)).st_mtime_ns)
        for f in sorted(os.listdir(d))
        if f.startswith("part-")
    }


def _killed(d: str, part: str) -> None:
    """What a job killed after writing every part but ``part`` leaves behind."""
    os.remove(os.path.join(d, part))
    os.remove(os.path.join(d, "manifest.json"))


def test_a_pass_says_where_its_time_went(tmp_path, tiny_task, ray_local):
    """Each shard's row says which model actor wrote it, when the actor began, had its model
    and took the shard; the pass logs the start-up, the wait for input and the models'
    busy share from them (what a GPU pass's fixed cost is made of)."""
    import time

    import numpy as np
    import pyarrow as pa
    import pytest

    class Slow(shards.ShardWriter):
        def __init__(self, out_dirs):
            super().__init__(out_dirs)
            time.sleep(0.2)  # loading a model
            self.ready()

        def process(self, part):
            return pa.table({"v": part["v"]}), 0

    cols = {shards.SET: np.array(["a"] * 2), shards.SHARD: np.array([0, 0]), "v": np.arange(2)}
    row = Slow({"a": str(tmp_path)})(shards.decoded(cols, np.ones((2, 1, 1, 3), np.uint8), None))
    assert row["ready"][0] - row["born"][0] >= 0.2 and row["start"][0] >= row["ready"][0]
    assert (
        row["spawned"][0] == pytest.approx(timeline.process_start())
        and row["spawned"][0] <= row["born"][0]
    )
    assert time.time() - 3600 * 24 < timeline.process_start() < time.time()
    assert row["actor"][0].endswith(f":{os.getpid()}")
    stats = [  # two actors: began at t=100, the pass ended at t=110
        dict(actor="a", spawned=100.5, born=101.0, ready=103.0, start=104.0, seconds=2.0),
        dict(actor="a", spawned=100.5, born=101.0, ready=103.0, start=106.0, seconds=2.0),
        dict(actor="b", spawned=100.2, born=102.0, ready=105.0, start=107.0, seconds=1.0),
    ]
    for row, rows in zip(stats, (100, 300, 500)):
        row["rows"] = rows
    # after the first shard's end (t=106): 300 + 500 rows by t=108
    assert timeline.steady_rate(stats) == pytest.approx(800 / 2)
    assert timeline.steady_rate(stats[:1]) is None
    assert timeline.timeline(stats, 100.0, 110.0) == (
        "3 shards in 10.0 s: the first model actor's process started after 0.2 s, had imported "
        "its code after 1.0 s and had its model after 3.0 s; the first shard reached a model "
        "after 4.0 s; from then on the 2 model actor(s) were busy 56% of the time"
    )  # 5 s of model time in (110 - 104) + (110 - 107) s
    said = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    log = logging.getLogger("ktray")  # ktray's one logger
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        cfg = _cfg(tiny_task, tmp_path / "out", "logits.views=1")
        logits_stage.run(cfg, "in_domain", shard_rows=8)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    said = [m for m in said if m.startswith("where the time went")]
    assert len(said) == 1 and "3 shards in" in said[0] and "1 model actor(s)" in said[0], said


def test_resumed_logits_job_leaves_finished_parts_untouched(tiny_task, tmp_path, ray_local):
    cfg = _cfg(tiny_task, tmp_path / "out", "logits.views=1")
    m = logits_stage.run(cfg, "in_domain", shard_rows=8)
    d = logits_stage.logits_dir(cfg, "in_domain")
    assert m["shards"] == 3 and m["computed_shards"] == 3 and m["rows"] == 24
    before = _stats(d)
    assert list(before) == [shards.part_name(s) for s in range(3)]
    _killed(d, "part-00001.parquet")
    m2 = logits_stage.run(cfg, "in_domain", shard_rows=8)
    assert m2["computed_shards"] == 1 and m2["rows"] == 24
    after = _stats(d)
    for part in ("part-00000.parquet", "part-00002.parquet"):
        assert after[part] == before[part], part  # same file: not rewritten, not replaced
    assert after["part-00001.parquet"] != before["part-00001.parquet"]
    table = storage.read_parquet(d)
    keys = list(zip(table["image_id"].to_pylist(), table["view"].to_pylist()))
    assert len(keys) == len(set(keys)) == 24


def test_killed_logits_job_rerun_under_other_settings_drops_its_parts(
    tiny_task, tmp_path, ray_local
):
    out = tmp_path / "out"
    cfg = _cfg(tiny_task, out, "logits.views=1")
    logits_stage.run(cfg, "in_domain", shard_rows=8)
    d = logits_stage.logits_dir(cfg, "in_domain")
    _killed(d, "part-00002.parquet")  # killed under views=1: parts 0 and 1 stay behind
    old = _stats(d)
    # the user changes a setting and reruns: nothing of the killed run may be reused
    cfg2 = _cfg(tiny_task, out, "logits.views=2")
    m = logits_stage.run(cfg2, "in_domain", shard_rows=16)
    assert m["shards"] == 3 and m["computed_shards"] == 3 and m["rows"] == 48
    new = _stats(d)
    assert all(new[p] != old[p] for p in old)
    table = storage.read_parquet(d)
    keys = list(zip(table["image_id"].to_pylist(), table["view"].to_pylist()))
    assert len(keys) == len(set(keys)) == 48
    assert sorted({v for _, v in keys}) == [0, 1]
    # parts carry float16 logits and, with no features@ method, no features
    schema = pq.read_schema(os.path.join(d, "part-00000.parquet"))
    assert str(schema.field("logits").type.value_type) == "halffloat"
    assert "features" not in schema.names


def test_writer_refuses_a_partial_shard_and_writes_whole_ones(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pytest

    class Echo(shards.ShardWriter):
        def process(self, part):
            keep = part[shards.OK]
            return pa.table({"v": part["v"][keep]}), int((~keep).sum())

    def batch(shard_ids, ok):
        cols = {
            shards.SET: np.array(["a"] * len(shard_ids)),
            shards.SHARD: np.array(shard_ids),
            "v": np.arange(len(shard_ids)),
        }
        return shards.decoded(cols, np.zeros((len(ok), 2, 2, 3), np.uint8), np.array(ok))

    writer = Echo({"a": str(tmp_path)})
    whole = batch([0, 0, 1], [True, False, True])
    stats = writer(whole)
    assert stats["rows"].tolist() == [1, 1] and stats["skipped"].tolist() == [1, 0]
    assert pq.read_table(tmp_path / "part-00000.parquet")["v"].to_pylist() == [0]
    assert sorted(os.listdir(tmp_path)) == ["part-00000.parquet", "part-00001.parquet"]
    # a shard split across batches (a block Ray Data cut in two) is never written partially
    partial = {k: v[:1] for k, v in batch([2, 2], [True, True]).items()}
    with pytest.raises(RuntimeError, match="shard 2: got 1 of 2 rows"):
        writer(partial)
    assert not (tmp_path / "part-00002.parquet").exists()


def test_a_writer_writes_its_parts_in_row_groups_of_its_size(tmp_path):
    """A logits part is written in 64-row groups: distillation reads it in stripes of whole
    groups from many places (``train.stripes``)."""
    import numpy as np
    import pyarrow as pa

    from ktray.stages import logits as logits_stage

    class Echo(shards.ShardWriter):
        row_group_rows = 2

        def process(self, part):
            return pa.table({"v": part["v"]}), 0

    n = 5
    cols = {shards.SET: np.array(["a"] * n), shards.SHARD: np.zeros(n, int), "v": np.arange(n)}
    Echo({"a": str(tmp_path)})(shards.decoded(cols, np.zeros((n, 2, 2, 3), np.uint8), np.ones(n)))
    meta = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2, 2, 1]
    assert logits_stage.LogitsWriter.row_group_rows == logits_stage.GROUP_ROWS == 64


def test_a_batch_of_one_whole_shard_reaches_the_model_uncopied(tmp_path):
    import numpy as np
    import pyarrow as pa

    seen = []

    class Spy(shards.ShardWriter):
        def process(self, part):
            seen.append(part[shards.PIXELS])
            return pa.table({"v": part["v"]}), 0

    cols = {shards.SET: np.array(["a"] * 3), shards.SHARD: np.array([4] * 3), "v": np.arange(3)}
    one = shards.decoded(cols, np.ones((3, 2, 2, 3), np.uint8), np.ones(3, bool))
    stats = Spy({"a": str(tmp_path)})(one)
    assert stats["rows"].tolist() == [3] and stats["shard"].tolist() == [4]
    assert seen[0] is one[shards.PIXELS]  # (a boolean-mask copy took 10-15 ms per 512 views)
    assert pq.read_table(tmp_path / "part-00004.parquet")["v"].to_pylist() == [0, 1, 2]


def test_logits_pass_on_a_gpu_cluster_keeps_whole_shards(tiny_task, tmp_path, ray_local):
    """On a cluster with GPUs the model actors ask for one each (``infer.gpus_per_actor=-1``)
    and still take one whole shard per call (Ray's public map_batches refuses GPUs without a
    batch size). The GPU is Ray's logical resource here; the model runs on CPU."""
    from conftest import start_ray

    ray_local.shutdown()
    try:
        start_ray(num_gpus=1)
        assert ray_local.cluster_resources().get("GPU") == 1
        cfg = _cfg(tiny_task, tmp_path / "out", "logits.views=1")
        m = logits_stage.run(cfg, "in_domain", shard_rows=8)
        assert m["shards"] == 3 and m["computed_shards"] == 3 and m["rows"] == 24
        d = logits_stage.logits_dir(cfg, "in_domain")
        parts = sorted(f for f in os.listdir(d) if f.startswith("part-"))
        assert [pq.read_metadata(os.path.join(d, f)).num_rows for f in parts] == [8, 8, 8]
        # with GPUs an actor runs two shards at once (shards.actor_calls), each in its own
        # thread: the same parts as one call at a time
        assert shards.actor_calls(cfg.infer, cluster_gpus=1) == 2
        one = _cfg(tiny_task, tmp_path / "one", "logits.views=1", "infer.calls_per_actor=1")
        logits_stage.run(one, "in_domain", shard_rows=8)
        d1 = logits_stage.logits_dir(one, "in_domain")
        for f in parts:
            a, b = pq.read_table(os.path.join(d, f)), pq.read_table(os.path.join(d1, f))
            assert a.equals(b), f
    finally:
        ray_local.shutdown()
        start_ray()


def test_model_actor_threads_follow_the_cluster(monkeypatch):
    """CPU-only: a node's cores go to the model actors (decoding is the cheap part); with GPUs
    an actor keeps its ``cpus_per_actor``; an explicit ``infer.threads_per_actor`` wins."""
    import ray

    from ktray.config import InferConfig

    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0}},
        {"Alive": False, "Resources": {"CPU": 64.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert shards.actor_threads(InferConfig(), cluster_gpus=0, pool=1) == 16
    assert shards.actor_threads(InferConfig(), cluster_gpus=0, pool=3) == 5
    assert shards.actor_threads(InferConfig(cpus_per_actor=4), cluster_gpus=2, pool=2) == 4
    assert shards.actor_threads(InferConfig(threads_per_actor=3), cluster_gpus=0, pool=1) == 3
    # shards an actor works on at once: two with GPUs (host work overlaps the GPU), one on CPU
    assert shards.actor_calls(InferConfig(), cluster_gpus=0) == 1
    assert shards.actor_calls(InferConfig(), cluster_gpus=4) == 2
    assert shards.actor_calls(InferConfig(calls_per_actor=3), cluster_gpus=0) == 3


def test_read_only_pixels_from_the_object_store_go_to_the_model_without_a_warning():
    """A shard's pixels reach the model actor as Ray's read-only object-store memory (not
    copied, above): turning them into a tensor must not print torch's "not writable" warning
    in every actor's log (nothing writes to them; the device copy comes first)."""
    import warnings

    import numpy as np
    import torch

    from ktray.predict import normalize_on_device

    pixels = np.full((2, 4, 4, 3), 255, np.uint8)
    pixels.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = normalize_on_device(pixels, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), torch.float32)
    assert x.shape == (2, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 2.0))


def test_a_long_pass_decodes_on_a_pool_of_actors_each_sent_two(tmp_path, ray_local, monkeypatch):
    """A pass of more than 24 shards a decode slot decodes on a pool of long-lived actors,
    each sent the shard it decodes and the next (as one-off tasks each shard waited for Ray
    Data's scheduling loop: 0.67-0.71 of the bare decode rate in
    ``benchmarks/infer_input_bench.py``, 0.89-0.90 as actors sent two): as many actors as the
    CPUs the model actors leave allow, or ``infer.decode_concurrency``. A shorter pass decodes
    in tasks (no actor start-up, ~2 s here)."""
    import pyarrow as pa

    from ktray.config import InferConfig
    from ktray.stages import decode_tasks

    def stage(blocks, free_cpus=15.0, **infer):
        got = decode_tasks.decode_stage(len, InferConfig(**infer), free_cpus, blocks)
        return got.get("compute"), got

    pool, got = stage(15 * 24 + 1)
    assert got["fn"] is decode_tasks.DecodeCalls and got["fn_constructor_args"] == (len,)
    assert (pool.initial_size, pool.min_size, pool.max_size) == (15, 1, float("inf"))
    assert pool.max_tasks_in_flight_per_actor == 2
    assert stage(15 * 24) == (None, {"fn": len, "concurrency": None})  # 24 a slot: tasks
    assert stage(49, free_cpus=1, decode_cpus=0.5)[0].initial_size == 2
    assert stage(25, free_cpus=0.5)[0].initial_size == 1
    capped, _ = stage(73, decode_concurrency=3)
    assert (capped.initial_size, capped.max_size) == (3, 3)
    assert stage(72, decode_concurrency=3) == (None, {"fn": len, "concurrency": 3})

    class Copy(shards.ShardWriter):
        def process(self, part):
            return pa.table({"v": part["v"]}), 0

    def _decode_where(block, out):
        """A decode function that says which process decoded each shard (its title and PID)."""
        import numpy as np

        with open("/proc/self/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
        shard = int(block[shards.SHARD][0].as_py())
        with open(os.path.join(out, f"{shard}.txt"), "w") as f:
            f.write(f"{os.getpid()} {title}")
        n = len(block)
        cols = {k: block[k].to_numpy(zero_copy_only=False) for k in (shards.SET, shards.SHARD, "v")}
        return shards.decoded(cols, np.zeros((n, 2, 2, 3), np.uint8), np.ones(n, bool))

    cfg = load_config(None, [f"out={tmp_path}/out", "ray.num_cpus=2"])
    monkeypatch.setattr(decode_tasks, "TASK_SHARDS_PER_SLOT", 2)  # short passes for the test
    for n, title in (
        (5, "ray::MapWorker(MapBatches(DecodeCalls)).submit"),
        (2, "ray::MapBatches(_decode_where)"),
    ):
        where, out = tmp_path / f"where{n}", tmp_path / f"out{n}"
        where.mkdir()
        out.mkdir()
        blocks = [shards.shard_block(pa.table({"v": list(range(40))}), "a", s, 8) for s in range(n)]
        rows = shards.map_shards(
            cfg,
            blocks,
            _decode_where,
            {"out": str(where)},
            Copy,
            {"out_dirs": {"a": str(out)}},
            8 * 12,
            lambda row: "",
        )
        assert sorted(r["shard"] for r in rows) == list(range(n))
        seen = [(where / f"{s}.txt").read_text().split(" ", 1) for s in range(n)]
        assert {t for _, t in seen} == {title}, seen
        if n == 5:  # 2 CPUs: the model actor's and one decode actor's
            assert len({pid for pid, _ in seen}) == 1
        for s in range(n):
            got = pq.read_table(out / f"part-{s:05d}.parquet")["v"].to_pylist()
            assert got == list(range(8 * s, 8 * s + 8))
