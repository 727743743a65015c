"""The model actor pools of the Ray Data passes (ktray.stages.shards): no restartable actors, so
Ray core logs no "constructor arguments in the object store and max_restarts > 0" ERROR line
(ray-project/ray#53727); an actor that dies fails only its own shards, which run again."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ktray.config import load_config
from ktray.stages import shards


def _decode(block: pa.Table) -> dict:
    n = len(block)
    cols = {k: block[k].to_numpy(zero_copy_only=False) for k in (shards.SET, shards.SHARD, "v")}
    return shards.decoded(cols, np.zeros((n, 2, 2, 3), np.uint8), np.ones(n, bool))


class DiesOnce(shards.ShardWriter):
    """Writes ``v`` of each shard; the actor process exits (as an out-of-memory kill would) the
    first time it gets shard 1."""

    def __init__(self, out_dirs: dict, marker: str, threads: int = 0):
        super().__init__(out_dirs, threads)
        self.marker = marker

    def process(self, part: dict) -> tuple[pa.Table, int]:
        if int(part[shards.SHARD][0]) == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return pa.table({"v": part["v"]}), 0


def test_model_actors_log_no_restart_error_and_rerun_a_dead_actors_shards(
    tmp_path, ray_local, capfd, recwarn
):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config("tiny", [f"out={tmp_path}/out", "tracking.mlflow=false", "infer.actors=1"])
    rows = pa.table({"v": np.arange(6, dtype=np.int64)})
    blocks = [shards.shard_block(rows, "a", s, 2) for s in range(3)]
    out, marker = tmp_path / "parts", tmp_path / "died"
    capfd.readouterr()
    stats = shards.map_shards(
        cfg,
        blocks,
        _decode,
        {},
        DiesOnce,
        {"out_dirs": {"a": str(out)}, "marker": str(marker)},
        block_bytes=2**16,
        describe=lambda r: f"shard {r[shards.SHARD]}",
    )
    err = capfd.readouterr().err
    assert marker.exists()  # the actor holding shard 1 died once
    assert sorted(r[shards.SHARD] for r in stats) == [0, 1, 2]
    assert sorted(os.listdir(out)) == [shards.part_name(s) for s in range(3)]
    written = pa.concat_tables(pq.read_table(out / shards.part_name(s)) for s in range(3))[
        "v"
    ].to_pylist()
    assert written == list(range(6))
    assert "max_restarts > 0" not in err and "53727" not in err, err[-2000:]
    assert not [w for w in recwarn if "ray_remote_args" in str(w.message)]


QUIET_PASS = """
import ray
from ktray.config import load_config
from ktray.stages.common import ensure_ray
ensure_ray(load_config("tiny", []).ray)
ray.data.range(10).map_batches(lambda b: b).materialize()
print("pass done")
"""


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_passes_log_no_execution_finished_line(tmp_path):
    """ktray logs each pass's shards; Ray Data's INFO "Dataset ... execution finished in N s",
    repeated for every dataset a run executes (each cached distillation epoch), is muted in a
    process whose Ray ktray started (a fresh process: ktray's Ray logging set-up)."""
    r = subprocess.run(
        [sys.executable, "-c", QUIET_PASS],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "pass done" in r.stdout, r.stderr[-2000:]
    assert "execution finished" not in r.stdout + r.stderr
