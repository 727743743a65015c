"""The distill stage through Ray Data in Train V2 local mode: online mode runs no logits
pass, and distill.targets=URI trains on any table following the logits contract."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ktray.config import load_config
from ktray.errors import KtrayError
from ktray.stages import distill as distill_stage


def test_online_mode_and_own_targets(tiny_task, tmp_path, ray_local):
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
    m2 = distill_stage.run(own, "in_domain", "task")
    assert m2["steps"] == 3 and m2["transfer_rows"] == len(unl) and not m2["uses_logits"]
    assert not os.path.exists(os.path.join(f"{out}-own", "logits"))
    pq.write_table(table.drop(["logits"]), uri)
    with pytest.raises(KtrayError, match="lacks column.*logits"):
        distill_stage.run(
            load_config("tiny", base + [f"distill.targets={uri}", f"out={out}-bad"]),
            "in_domain",
            "task",
        )


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
