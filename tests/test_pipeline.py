"""End-to-end: `ktray run` on a tiny generated task, reuse on rerun, bad input."""

import json
import os
import re

import pytest

from ktray import cli, storage
from ktray.config import load_config
from ktray.stages import logits as logits_stage


def run_cli(*args):
    return cli.main(list(args))


def test_tiny_pipeline_end_to_end_and_reuse(tiny_task, tmp_path, ray_local, capsys, monkeypatch):
    from ktray import storage

    out = str(tmp_path / "out")
    listed = []  # data.root is listed once a command, however many stages key on it
    take = storage._fingerprint
    monkeypatch.setattr(storage, "_fingerprint", lambda uri: listed.append(uri) or take(uri))
    assert run_cli("run", "tiny", f"data.root={tiny_task}", f"out={out}") == 0
    assert listed == [tiny_task]
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["task"] == "tiny" and results["num_classes"] == 3
    assert set(results["methods"]) == {"teacher", "scratch", "task@in_domain"}
    # every number is the one its stage measured (not a default, not another method's)
    methods = results["methods"]

    def manifest(*parts):
        with open(os.path.join(out, *parts, "manifest.json")) as f:
            return json.load(f)

    teacher, scratch = manifest("teacher"), manifest("finetune", "scratch")
    distill, finetune = (
        manifest("distill", "task@in_domain"),
        manifest("finetune", "task@in_domain"),
    )
    logits = manifest("logits", "in_domain")
    assert methods["teacher"]["test_accuracy"] == teacher["test_accuracy"]
    assert methods["scratch"]["test_accuracy"] == scratch["test_accuracy"]
    assert methods["task@in_domain"]["test_accuracy"] == finetune["test_accuracy"]
    assert methods["task@in_domain"]["distill_test_accuracy"] == distill["test_accuracy"]
    assert methods["task@in_domain"]["train_seconds"] == pytest.approx(
        distill["train_seconds"] + finetune["train_seconds"]
    )
    assert methods["task@in_domain"]["pretrain_flops"] == pytest.approx(
        distill["flops"] + logits["flops"]
    )
    assert distill["flops"] > 0 and logits["flops"] > 0
    assert results["models"]["scratch"] == scratch["outputs"]["model"]
    for name in (
        "results.md",
        "results.png",
        "data/train.parquet",
        "teacher/model/model.json",
        "teacher/config.yaml",
        "finetune/scratch/manifest.json",
        "distill/task@in_domain/model/model.safetensors",
    ):
        assert os.path.exists(os.path.join(out, name)), name
    assert open(os.path.join(out, "results.png"), "rb").read(4) == b"\x89PNG"
    # the teacher's predictions: 24 unlabeled images x 2 views, each with its view's box
    table = storage.read_parquet(os.path.join(out, "logits", "in_domain"))
    assert table.num_rows == 48
    assert len(table["logits"][0]) == 3
    assert sorted(set(table["view"].to_pylist())) == [0, 1]
    m = json.load(open(os.path.join(out, "logits", "in_domain", "manifest.json")))
    assert m["rows"] == 48 and m["skipped_views"] == m["skipped_images"] == 0 and m["images"] == 24
    table_out = capsys.readouterr().out
    assert "task@in_domain" in table_out and "test acc" in table_out

    # a rerun reuses every finished stage (manifests untouched)
    stamp = os.path.getmtime(os.path.join(out, "distill", "task@in_domain", "manifest.json"))
    assert run_cli("run", "tiny", f"data.root={tiny_task}", f"out={out}") == 0
    assert (
        os.path.getmtime(os.path.join(out, "distill", "task@in_domain", "manifest.json")) == stamp
    )
    capsys.readouterr()
    # ... and evaluate works on any checkpoint
    assert (
        run_cli(
            "evaluate",
            "tiny",
            f"data.root={tiny_task}",
            f"out={out}",
            "--checkpoint",
            os.path.join(out, "finetune", "scratch", "model"),
        )
        == 0
    )
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_accuracy"] == pytest.approx(results["methods"]["scratch"]["test_accuracy"])


def test_logits_skip_corrupt_and_resume_without_duplicates(tiny_task, tmp_path, ray_local):
    bad = os.path.join(tiny_task, "unlabeled", "part0", "broken.jpg")
    open(bad, "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = str(tmp_path / "out")
    cfg = load_config("tiny", [f"data.root={tiny_task}", f"out={out}", "logits.views=2"])
    m = logits_stage.run(cfg, "in_domain", shard_rows=20)
    # the broken image's 2 views are skipped: 1 image, 2 views, counted as such
    assert m["images"] == 25 and m["rows"] == 48
    assert m["skipped_images"] == 1 and m["skipped_views"] == 2
    assert m["shards"] == 3
    d = logits_stage.logits_dir(cfg, "in_domain")
    # a killed job: one shard's file and the manifest never written
    os.remove(os.path.join(d, "part-00001.parquet"))
    os.remove(os.path.join(d, "manifest.json"))
    m2 = logits_stage.run(cfg, "in_domain", shard_rows=20)
    assert m2["computed_shards"] == 1 and m2["rows"] == 48
    t = storage.read_parquet(d)
    keys = list(zip(t["image_id"].to_pylist(), t["view"].to_pylist()))
    assert len(keys) == len(set(keys)) == 48
    assert not [f for f in os.listdir(d) if ".tmp" in f]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.root=/no/such/dir"], "data.root not found: /no/such/dir"),
        (
            ["teacher.backbone=vit_nonexistent_xl"],
            "teacher.backbone: unknown model 'vit_nonexistent_xl'",
        ),
        (["student.arch=resnet_999"], "student.arch: unknown model 'resnet_999'"),
        (["teacher.bakbone=x"], "did you mean 'teacher.backbone'"),
        (["methods=[scratch,magic@in_domain]"], "unknown objective 'magic'"),
    ],
)
def test_bad_input_is_one_line_error_before_ray(tiny_task, tmp_path, capsys, overrides, message):
    import ray

    was = ray.is_initialized()
    args = ["run", "tiny", f"data.root={tiny_task}", f"out={tmp_path}/o"] + overrides
    assert run_cli(*args) == 2
    # Ray's log monitor may still relay an earlier test's worker lines ("(Actor pid=N) ...")
    # into this process's stderr: they are not the CLI's output
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(x for x in lines if not re.search(r"^(\x1b\[\d+m)?\(\S.* pid=\d+", x))
    assert message in err and len(err.splitlines()) == 1, err
    assert ray.is_initialized() == was


def test_empty_class_folder_and_corrupt_labeled_image(tiny_task, tmp_path, capsys):
    os.makedirs(os.path.join(tiny_task, "train", "empty_class"))
    assert run_cli("run", "tiny", f"data.root={tiny_task}", f"out={tmp_path}/a") == 2
    assert "empty_class" in capsys.readouterr().err
    os.rmdir(os.path.join(tiny_task, "train", "empty_class"))
    bad = os.path.join(tiny_task, "train", "class1", "0.png")
    open(bad, "wb").write(b"garbage")
    assert run_cli("teacher", "tiny", f"data.root={tiny_task}", f"out={tmp_path}/b") == 2
    assert "0.png" in capsys.readouterr().err


def test_teacher_checkpoint_with_wrong_class_count(tiny_task, tmp_path, ray_local, capsys):
    out = str(tmp_path / "out")
    assert run_cli("teacher", "tiny", f"data.root={tiny_task}", f"out={out}") == 0
    other = os.path.join(str(tmp_path), "other")
    from imagegen import make_imagefolder

    make_imagefolder(other, classes=4, train=4, test=2, unlabeled=4)
    code = run_cli(
        "teacher",
        "tiny",
        f"data.root={other}",
        f"out={tmp_path}/o2",
        f"teacher.checkpoint={out}/teacher/model",
    )
    assert code == 2
    assert "3 classes but the task has 4" in capsys.readouterr().err
