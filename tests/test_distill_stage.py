"""The distill stage through Ray Data in Train V2 local mode: online mode runs no logits
pass, and distill.targets=URI trains on any table following the logits contract."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ktray.config import load_config
from ktray.errors import KtrayError
from ktray.stages import distill as distill_stage


def test_online_mode_and_own_targets(tiny_task, tmp_path, ray_local, monkeypatch):
    out = str(tmp_path / "out")
    base = [f"data.root={tiny_task}", f"out={out}", "distill.steps=3", "distill.batch_size=8"]
    m = distill_stage.run(
        load_config("tiny", base + ["distill.teacher_mode=online"]), "in_domain", "task"
    )
    assert m["steps"] == 3 and m["images_seen"] == 24
    assert not m["uses_logits"] and m["transfer_rows"] == 48  # 24 images x 2 views
    assert not os.path.exists(os.path.join(out, "logits"))  # no logits pass
    # the teacher's forward passes are in this stage's FLOPs (counted once)
    assert m["flops"] > 3 * m["flops_per_image"] * m["images_seen"]

    # a hand-made table: float32 variable lists, no box / flip columns (full images)
    unl = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(os.path.join(tiny_task, "unlabeled")) for f in fs
    )
    table = pa.table(
        {
            "image_id": [f"u{i}" for i in range(len(unl))],
            "source": unl,
            "logits": pa.array(
                [[float(i % 3), 0.0, 1.0] for i in range(len(unl))], pa.list_(pa.float32())
            ),
            "note": ["ignored"] * len(unl),
        }
    )
    uri = str(tmp_path / "mine.parquet")
    pq.write_table(table, uri)
    own = load_config("tiny", base + [f"distill.targets={uri}", f"out={out}-own"])
    from ktray.data import row_ranges
    from ktray.stages import train_data

    reads = []  # the table's footers are read once: checked, then cut into ranges

    def footers(files, _read=row_ranges.footers):
        reads.append(list(files))
        return _read(files)

    monkeypatch.setattr(row_ranges, "footers", footers)
    monkeypatch.setattr(train_data, "footers", footers)
    m2 = distill_stage.run(own, "in_domain", "task")
    assert reads == [[uri]]
    assert m2["steps"] == 3 and m2["transfer_rows"] == len(unl) and not m2["uses_logits"]
    assert not os.path.exists(os.path.join(f"{out}-own", "logits"))
    # a rerun reuses the student; the table rewritten under the same path trains afresh
    done = os.path.join(f"{out}-own", "distill", "task@in_domain", "manifest.json")
    stamp = os.stat(done).st_mtime_ns
    assert distill_stage.run(own, "in_domain", "task")["config_hash"] == m2["config_hash"]
    assert os.stat(done).st_mtime_ns == stamp
    flipped = pa.array([[1.0, 0.0, float(i % 3)] for i in range(len(unl))], pa.list_(pa.float32()))
    pq.write_table(table.set_column(2, "logits", flipped), uri)
    m3 = distill_stage.run(own, "in_domain", "task")
    assert m3["config_hash"] != m2["config_hash"] and os.stat(done).st_mtime_ns != stamp
    bad = load_config("tiny", base + [f"distill.targets={uri}", f"out={out}-bad"])
    pq.write_table(table.drop(["logits"]), uri)
    with pytest.raises(KtrayError, match="lacks column.*logits"):
        distill_stage.run(bad, "in_domain", "task")
    # the wrong class count, and no rows: one-line errors before Ray starts any work
    wide = pa.array([[0.0] * 4] * len(unl), pa.list_(pa.float32()))
    pq.write_table(table.set_column(2, "logits", wide), uri)
    with pytest.raises(KtrayError, match="4 logits per row, but the task has 3 classes"):
        distill_stage.run(bad, "in_domain", "task")
    pq.write_table(table.slice(0, 0), uri)
    with pytest.raises(KtrayError, match="has no rows"):
        distill_stage.run(bad, "in_domain", "task")


def test_consistent_fresh_views_online(tiny_task, tmp_path, ray_local):
    """distill.augment=consistent: one row per image (views drawn at each step), teacher
    online, mixup on; the precomputed mode refuses both settings in one line."""
    out = str(tmp_path / "out")
    base = [f"data.root={tiny_task}", f"out={out}", "distill.steps=3", "distill.batch_size=8"]
    online = ["distill.teacher_mode=online", "distill.augment=consistent", "distill.mixup=0.4"]
    m = distill_stage.run(load_config("tiny", base + online), "in_domain", "task")
    assert m["steps"] == 3 and m["images_seen"] == 24
    assert m["transfer_rows"] == 24 and not m["uses_logits"]  # 24 images, not 24 x 2 views
    assert m["metrics"]["loss"] > 0
    with pytest.raises(KtrayError, match="augment=consistent needs distill.teacher_mode=online"):
        load_config("tiny", base + ["distill.augment=consistent"])
    with pytest.raises(KtrayError, match="mixup needs distill.teacher_mode=online"):
        load_config("tiny", base + ["distill.mixup=0.2"])


def _weights(out):
    from safetensors.torch import load_file

    found = [
        os.path.join(r, "model.safetensors")
        for r, _, fs in os.walk(out)
        if "model.safetensors" in fs
    ]
    assert len(found) == 1, found
    return load_file(found[0])


@pytest.mark.parametrize("workers", [0, 2], ids=["local", "2-ddp-workers"])
def test_a_seeded_distillation_trains_the_same_student_twice(
    tiny_task, tmp_path, ray_local, workers
):
    """train.reproducible (default): the file order, the block order and the shuffle buffer
    are seeded and the blocks reach the loop in that order, so the same seed trains the same
    weights (CPU) although the decode actors finish in any order. With two DDP workers too:
    under ``preserve_order`` Ray Data deals the ordered blocks to the workers by the rows
    each has had (a dataset config that drops it for Train's workers fails this)."""
    unl = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(os.path.join(tiny_task, "unlabeled")) for f in fs
    )
    rng = np.random.default_rng(0)
    rows = [(i, unl[i % len(unl)]) for i in range(96)]
    parts = tmp_path / "targets"
    parts.mkdir()
    for k in range(0, len(rows), 4):  # 24 parts: blocks decoded by tasks in parallel
        chunk = rows[k : k + 4]
        pq.write_table(
            pa.table(
                {
                    "image_id": [f"v{i}" for i, _ in chunk],
                    "source": [s for _, s in chunk],
                    "flip": [bool(i % 2) for i, _ in chunk],
                    "logits": pa.array(
                        rng.normal(0, 3, (len(chunk), 3)).astype(np.float16).tolist(),
                        pa.list_(pa.float16()),
                    ),
                }
            ),
            parts / f"part-{k:05d}.parquet",
        )

    def run(name, *more):
        out = str(tmp_path / name)
        cfg = load_config(
            "tiny",
            [
                f"data.root={tiny_task}",
                f"out={out}",
                f"distill.targets={parts}",
                "distill.steps=8",  # 2 passes over 48 rows, in one execution
                "distill.batch_size=12",
                "train.decode_batch=2",
                "train.shuffle_buffer=16",
                "train.cache_decoded_mb=0",  # stream: the decode order is live every pass
                f"ray.num_workers={workers}",
                *more,
            ],
        )
        distill_stage.run(cfg, "in_domain", "task")
        return _weights(out)

    a, b = run("a"), run("b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = run("c", "train.seed=1")
    assert any(not torch.equal(a[k], c[k]) for k in a)
