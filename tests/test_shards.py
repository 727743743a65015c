"""The shard writer of the inference passes (ktray.stages.shards), through the logits stage:
a killed job resumes without touching finished parts, and parts made under other settings are
never reused."""

import os

import pyarrow.parquet as pq

from ktray import storage
from ktray.config import load_config
from ktray.stages import logits as logits_stage
from ktray.stages import shards


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
