"""Reuse of finished stages: an unchanged config reuses the finished run (its files untouched);
a changed stage setting retrains. (Logits: tests/test_logits_stage.py.)"""

import os

import pytest
from imagegen import make_imagefolder

from ktray.config import load_config
from ktray.pipeline import manifest
from ktray.stages import finetune as finetune_stage
from ktray.stages import teacher as teacher_stage


def _stamp(stage_dir: str) -> tuple:
    """Identity of a finished run's files: (inode, mtime) of its manifest and model weights."""
    files = ("manifest.json", os.path.join("model", "model.safetensors"))
    return tuple(
        (
            os.stat(os.path.join(stage_dir, f)).st_ino,
            os.stat(os.path.join(stage_dir, f)).st_mtime_ns,
        )
        for f in files
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_stages_reuse_only_an_identical_config(tmp_path, ray_local):
    root = make_imagefolder(str(tmp_path / "task"), train=4, test=2, unlabeled=0)
    out = str(tmp_path / "out")
    base = [
        f"data.root={root}",
        f"out={out}",
        "data.generic_images=0",
        "teacher.epochs=1",
        "finetune.scratch_steps=2",
    ]

    def finetune(*extra):
        return finetune_stage.run(load_config("tiny", base + list(extra)))

    scratch = os.path.join(out, "finetune", "scratch")
    m1 = finetune()
    assert m1["steps"] == 2
    stamp = _stamp(scratch)
    assert finetune() == m1 and _stamp(scratch) == stamp  # reused, nothing rewritten
    m2 = finetune("finetune.scratch_steps=3")  # a stage setting changed: retrained
    assert m2["steps"] == 3 and _stamp(scratch) != stamp
    stamp = _stamp(scratch)
    m3 = finetune("finetune.scratch_steps=3", "finetune.scratch_lr=0.004")
    assert m3["config_hash"] != m2["config_hash"] and _stamp(scratch) != stamp
    stamp = _stamp(scratch)
    m4 = finetune("finetune.scratch_steps=3", "finetune.scratch_lr=0.004", "student.img_size=24")
    assert m4["config_hash"] != m3["config_hash"] and _stamp(scratch) != stamp

    teacher_dir = os.path.join(out, "teacher")
    t1 = teacher_stage.run(load_config("tiny", base))
    stamp = _stamp(teacher_dir)
    assert teacher_stage.run(load_config("tiny", base)) == t1 and _stamp(teacher_dir) == stamp
    t2 = teacher_stage.run(load_config("tiny", base + ["teacher.lr=0.002"]))
    assert t2["config_hash"] != t1["config_hash"] and _stamp(teacher_dir) != stamp


def test_a_finished_run_of_another_config_is_not_reused(tmp_path):
    d = str(tmp_path / "finetune" / "scratch")
    written = manifest.write(d, {"stage": "finetune", "config_hash": "aaaa", "rows": 3})
    assert manifest.load_finished(d, "aaaa") == written
    assert manifest.load_finished(d, "bbbb") is None
    assert manifest.load_finished(str(tmp_path / "never-ran"), "aaaa") is None
