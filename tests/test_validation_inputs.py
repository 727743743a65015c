"""The whole config is checked before any work starts: the task's files, transfer sets,
models and their weights, object stores (reachable, credentials, buckets), and inputs that
change between runs. Every failure is one line (``ktray: error: ...``) and exit code 2.
"""

import os
import shutil
import time

import pytest
from cli_errors import one_line_error
from imagegen import make_imagefolder

from ktray import cli, storage
from ktray.config import load_config
from ktray.errors import KtrayError
from ktray.models import create_student, save_model
from ktray.pipeline import manifest, tasks
from ktray.pipeline.validate import check_config

# ---------------------------------------------------------------- whole-config checks


@pytest.fixture
def task(tmp_path):
    return make_imagefolder(str(tmp_path / "task"), train=4, test=2, unlabeled=6)


def test_root_without_unlabeled_stops_before_any_work(task, tmp_path, capsys):
    shutil.rmtree(os.path.join(task, "unlabeled"))
    out = str(tmp_path / "out")
    line = one_line_error(capsys, ["run", "tiny", f"data.root={task}", f"out={out}"])
    assert "transfer set 'in_domain' needs unlabeled images" in line and "unlabeled/" in line
    assert not os.path.exists(out)


def test_unknown_transfer_with_flags_before_overrides(task, tmp_path, capsys):
    out = str(tmp_path / "out")
    line = one_line_error(
        capsys, ["logits", "tiny", f"data.root={task}", "--transfer", "in_domian", f"out={out}"]
    )
    assert "unknown transfer set 'in_domian' (did you mean 'in_domain'?)" in line
    assert not os.path.exists(out)
    line = one_line_error(
        capsys, ["distill", "tiny", f"data.root={task}", f"out={out}", "--objective", "feat"]
    )
    assert "--objective must be one of task, features, got 'feat'" in line
    assert not os.path.exists(out)
    args = cli.parse_args(["-v", "logits", "tiny", "--transfer", "generic", "out=/x", "a.b=1"])
    assert (args.transfer, args.overrides, args.verbose) == ("generic", ["out=/x", "a.b=1"], True)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "teacher.backbone=efficientnet_lite9",
            "teacher.backbone: unknown model 'efficientnet_lite9'",
        ),
        ("student.arch=resnett18", "student.arch: unknown model 'resnett18'"),
        ("student.checkpoint=/no/such/model", "student.checkpoint: checkpoint not found"),
        ("teacher.checkpoint=/no/such.pth", "teacher.checkpoint: checkpoint not found"),
    ],
)
def test_models_are_checked_before_any_work(override, message, task, tmp_path, capsys):
    out = str(tmp_path / "out")
    line = one_line_error(capsys, ["run", "tiny", f"data.root={task}", f"out={out}", override])
    assert message in line, line
    assert not os.path.exists(out)


def test_pretrained_weights_are_checked_up_front_offline(task, tmp_path, monkeypatch):
    from ktray.models import weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "hub_cached", lambda *a, **k: False)
    for overrides, message in (
        (
            ["teacher.backbone=open_clip:ViT-B-32:laion2b_s34b_b79k", "teacher.pretrained=true"],
            "teacher.backbone: open_clip:ViT-B-32:laion2b_s34b_b79k needs hub repo",
        ),
        (
            ["student.arch=resnet18.a1_in1k", "student.pretrained=true"],
            "student.arch: resnet18.a1_in1k needs hub repo timm/resnet18.a1_in1k",
        ),
        (["curate.encoder=vit_small_patch16_224.augreg_in21k"], "curate.encoder: "),
    ):
        cfg = load_config("tiny", [f"data.root={task}", f"out={tmp_path}/o", *overrides])
        start = time.perf_counter()
        with pytest.raises(KtrayError) as info:
            check_config(cfg, ["curated"], will_curate=True)
        assert message in str(info.value) and "not in the local cache" in str(info.value)
        assert time.perf_counter() - start < 5


def test_student_checkpoint_may_be_a_model_folder(task, tmp_path):
    folder = str(tmp_path / "finetune" / "task@in_domain" / "model")
    save_model(create_student("test_resnet", 3, img_size=32), folder)
    cfg = load_config(
        "tiny", [f"data.root={task}", f"out={tmp_path}/o", f"student.checkpoint={folder}"]
    )
    check_config(cfg)
    model = create_student("test_resnet", 5, checkpoint=folder, img_size=32)  # new head size
    assert model.num_classes == 5


def test_partially_fitting_state_dicts_are_refused_up_front(task, tmp_path):
    import torch
    from safetensors.torch import save_file

    from ktray.models import create_backbone

    state = create_student("test_resnet", 3).state_dict()
    first = next(iter(state))
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != first},
        str(tmp_path / "missing.safetensors"),
    )
    save_file(
        {**{k: v.contiguous() for k, v in state.items()}, "extra.weight": torch.ones(2)},
        str(tmp_path / "extra.safetensors"),
    )
    bb = create_backbone("test_vit", pretrained=False, img_size=32).model.state_dict()
    save_file(
        {**{k: v.contiguous() for k, v in bb.items()}, "blocks.9.w": torch.ones(2)},
        str(tmp_path / "teacher.safetensors"),
    )
    for key, path, message in (
        ("student.checkpoint", "missing", f"1 missing ({first})"),
        ("student.checkpoint", "extra", "1 unexpected (extra.weight)"),
        ("teacher.checkpoint", "teacher", "1 unexpected (blocks.9.w)"),
    ):
        cfg = load_config(
            "tiny",
            [f"data.root={task}", f"out={tmp_path}/o", f"{key}={tmp_path}/{path}.safetensors"],
        )
        with pytest.raises(KtrayError) as info:
            check_config(cfg)
        assert str(info.value).startswith(f"{key}: ") and message in str(info.value)


# ------------------------------------------------------------------------ object stores


@pytest.fixture
def loopback_s3(monkeypatch, tmp_path):
    """An S3 endpoint nothing listens on (port 9), no credential files, no instance role."""
    import s3fs

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def test_unreachable_endpoint_is_one_line_and_bounded(loopback_s3):
    loopback_s3.setenv("AWS_ACCESS_KEY_ID", "fake")
    loopback_s3.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    start = time.perf_counter()
    with pytest.raises(KtrayError) as info:
        storage.probe("s3://bucket/run", "out")
    assert time.perf_counter() - start < 30
    msg = str(info.value)
    assert msg.startswith("out=s3://bucket/run: cannot reach the object store")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (set)" in msg
    assert "AWS_ENDPOINT_URL (http://127.0.0.1:9)" in msg and "\n" not in msg


def test_missing_credentials_is_one_line(loopback_s3, task, capsys):
    line = one_line_error(capsys, ["run", "tiny", f"data.root={task}", "out=s3://bucket/run"])
    assert line.startswith("ktray: error: out=s3://bucket/run: no S3 credentials found")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (not set)" in line and "~/.aws" in line


def test_s3_server_missing_bucket_and_wrong_key(s3_server, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(
        KtrayError,
        match=r"data.root=s3://no-such-bucket-x/d: bucket "
        r"'no-such-bucket-x' does not exist",
    ):
        storage.probe("s3://no-such-bucket-x/d", "data.root")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(KtrayError, match=r"^out=s3://\S+: access denied"):
            storage.probe(f"s3://{s3_server.bucket}/run", "out")
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


# -------------------------------------------------------------- changed inputs, transfer URIs


def test_corrupt_labeled_image_deleted_then_rerun(task, tmp_path):
    bad = os.path.join(task, "train", "class1", "broken.png")
    open(bad, "wb").write(b"not an image")
    cfg = load_config("tiny", [f"data.root={task}", f"out={tmp_path}/o"])
    with pytest.raises(KtrayError, match=r"1 labeled image\(s\) cannot be read.*broken.png"):
        tasks.prepare_task(cfg)
    assert not os.path.exists(os.path.join(tmp_path, "o", "data", "manifest.json"))
    os.remove(bad)
    info = tasks.prepare_task(cfg)
    assert info["rows"]["train"] == 12
    # a file added (or removed) later is seen too: the data stage is not reused
    make_imagefolder(str(tmp_path / "more"), train=1, test=1, unlabeled=0, seed=5)
    shutil.copy(
        os.path.join(tmp_path, "more", "train", "class0", "0.png"),
        os.path.join(task, "train", "class0", "new.png"),
    )
    again = tasks.prepare_task(cfg)
    assert again["config_hash"] != info["config_hash"] and again["rows"]["train"] == 13
    assert tasks.prepare_task(cfg)["config_hash"] == again["config_hash"]  # unchanged: reused


def test_fingerprint_sees_added_removed_and_replaced_files(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.png").write_bytes(b"1")
    fp = [storage.fingerprint(str(d))]
    (d / "b.png").write_bytes(b"2")
    fp.append(storage.fingerprint(str(d)))
    (d / "b.png").write_bytes(b"22")
    fp.append(storage.fingerprint(str(d)))
    os.utime(d / "b.png", (1, 1))
    fp.append(storage.fingerprint(str(d)))
    os.remove(d / "b.png")
    fp.append(storage.fingerprint(str(d)))
    assert len(set(fp[:4])) == 4 and fp[4] == fp[0]
    # a brace pattern: the listing of every file it names
    for i in range(2):
        (d / f"s-{i:03d}.tar").write_bytes(b"x")
    braces = str(d / "s-{000..001}.tar")
    first = storage.fingerprint(braces)
    assert first != storage.fingerprint(str(d / "s-000.tar"))
    (d / "s-001.tar").write_bytes(b"yy")
    assert storage.fingerprint(braces) not in (first, storage.fingerprint(str(d / "s-000.tar")))


def test_a_command_takes_each_listing_once(tmp_path):
    """Within ``listings_fixed`` (a CLI command, a sweep trial) a listing is taken once: the
    inputs as they were when the command started; outside it, afresh every time."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.png").write_bytes(b"1")
    before = storage.fingerprint(str(d))
    with storage.listings_fixed():
        assert storage.fingerprint(str(d)) == before
        (d / "b.png").write_bytes(b"2")
        assert storage.fingerprint(str(d)) == before
        with storage.listings_fixed():  # nested: the same command
            assert storage.fingerprint(str(d)) == before
    after = storage.fingerprint(str(d))
    assert after != before
    with storage.listings_fixed():
        assert storage.fingerprint(str(d)) == after


def test_files_fingerprint_stats_the_named_files(tmp_path):
    """The labeled images' stamp: each named file's size and modification time (no listing),
    a missing file counted as missing; taken once a command."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    first = storage.files_fingerprint([str(a), str(b)])
    assert storage.files_fingerprint([str(b), str(a), str(a)]) == first  # a set of names
    (tmp_path / "c.png").write_bytes(b"3")  # another file in the folder: not named, no change
    assert storage.files_fingerprint([str(a), str(b)]) == first
    os.utime(a, (1, 1))
    replaced = storage.files_fingerprint([str(a), str(b)])
    assert replaced != first
    os.remove(b)
    assert storage.files_fingerprint([str(a), str(b)]) not in (first, replaced)
    with storage.listings_fixed():
        taken = storage.files_fingerprint([str(a)])
        os.utime(a, (2, 2))
        assert storage.files_fingerprint([str(a)]) == taken
    assert storage.files_fingerprint([str(a)]) != taken


def _tar_shards(folder, n=2, per=3):
    import io
    import tarfile

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for s in range(n):
        with tarfile.open(os.path.join(folder, f"unl-{s:03d}.tar"), "w") as tar:
            for i in range(per):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (i * 40, s * 80, 0)).save(buf, "PNG")
                info = tarfile.TarInfo(f"{s}_{i}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("pattern", ["unl-{000..001}.tar", "*.tar", ""])
def test_transfer_uris_with_globs_and_braces(pattern, task, tmp_path):
    shards = str(tmp_path / "shards")
    _tar_shards(shards)
    uri = os.path.join(shards, pattern) if pattern else shards
    cfg = load_config("tiny", [f"data.root={task}", f"out={tmp_path}/o"])
    check_config(cfg, [uri])
    assert len(tasks.read_transfer(cfg, uri)) == 6
    out_dir = manifest.stage_dir(cfg.out, "logits", uri)
    assert out_dir.startswith(os.path.join(cfg.out, "logits") + "/")
    assert shards not in out_dir and "/" not in out_dir[len(cfg.out) + 8 :]
    assert manifest.stage_dir(cfg.out, "distill", f"task@{uri}").count("/") == out_dir.count("/")
    with pytest.raises(KtrayError, match="unknown transfer set"):
        check_config(cfg, [os.path.join(shards, "none-*.tar")])
