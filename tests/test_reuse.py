"""Reuse of finished stages: an unchanged config reuses the finished run (its files untouched);
a changed stage setting or a labeled image replaced in place retrains. (Logits:
tests/test_logits_stage.py.)"""

import os
import shutil

import pytest
from imagegen import make_imagefolder

from ktray import storage
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
    # a labeled image replaced under its own name (same ids, sources and labels): retrained
    from ktray.pipeline.tasks import prepare_task

    cfg = load_config("tiny", base + ["teacher.lr=0.002"])
    train = storage.read_parquet(prepare_task(cfg)["outputs"]["train"])["source"].to_pylist()
    stamp = _stamp(teacher_dir)
    shutil.copy(train[1], train[0])
    t3 = teacher_stage.run(cfg)
    assert t3["config_hash"] != t2["config_hash"] and _stamp(teacher_dir) != stamp
    assert teacher_stage.run(cfg)["config_hash"] == t3["config_hash"]  # and then reused


def test_a_finished_run_of_another_config_is_not_reused(tmp_path):
    d = str(tmp_path / "finetune" / "scratch")
    written = manifest.write(d, {"stage": "finetune", "config_hash": "aaaa", "rows": 3})
    assert manifest.load_finished(d, "aaaa") == written
    assert manifest.load_finished(d, "bbbb") is None
    assert manifest.load_finished(str(tmp_path / "never-ran"), "aaaa") is None


def test_train_run_name_follows_the_spec(tmp_path, monkeypatch):
    """Ray Train restores the latest checkpoint of a run of the same name: the name carries
    the spec's hash, so a changed spec never resumes from another configuration's
    checkpoint, while a rerun of the same spec (a killed job) keeps its name and resumes."""
    from ktray.stages import train_stage

    root = make_imagefolder(str(tmp_path / "task"), train=2, test=1, unlabeled=0)
    names = []

    def fake_fit(cfg, name, worker, spec, datasets=None):
        names.append(name)
        return {"step": spec["spec"]["steps"], "images": 1, "seconds": 0.1}

    monkeypatch.setattr(train_stage, "fit", fake_fit)
    monkeypatch.setattr(train_stage, "ensure_ray", lambda *a, **k: None)

    def finetune(*extra):
        cfg = load_config("tiny", [f"data.root={root}", f"out={tmp_path / 'o'}", *extra])
        monkeypatch.setattr(train_stage, "_evaluate", lambda r, *a: r)
        return finetune_stage.run(cfg)

    finetune("finetune.scratch_steps=2")
    finetune("finetune.scratch_steps=3")
    os.remove(os.path.join(tmp_path, "o", "finetune", "scratch", "manifest.json"))
    finetune("finetune.scratch_steps=3")  # the same spec again (a killed run): same name
    assert names[0].startswith("finetune-scratch-") and names[0] != names[1], names
    assert names[2] == names[1], names
