"""The distillation input and loop without Ray: decoding to uint8, streaming, the worker's
checkpoints (no teacher), step-based resume, no per-step host sync, bf16 on CPU."""

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ktray.config import load_config
from ktray.data import columns as C
from ktray.data.datasets import DecodeViews, ViewStream, normalize
from ktray.data.views import ViewParams, apply_view
from ktray.train.loop import LocalSession, train_steps
from ktray.train.specs import DistillSpec, TeacherSpec
from ktray.train.worker import build_teacher, run_training

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _rows(tmp_path, n=24, classes=3, bad=(), files=2):
    """``files`` Parquet parts of view rows over generated PNGs (rows in ``bad`` unreadable)."""
    rng = np.random.default_rng(0)
    srcs = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        if i in bad:
            p.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(p)
        srcs.append(str(p))
    logits = rng.normal(size=(n, classes)).astype(np.float16)
    table = pa.table(
        {
            C.IMAGE_ID: [f"i{i}" for i in range(n)],
            C.SOURCE: srcs,
            "x0": pa.array([0.1 * (i % 3) for i in range(n)], pa.float32()),
            "y0": pa.array([0.0] * n, pa.float32()),
            "x1": pa.array([0.9] * n, pa.float32()),
            "y1": pa.array([1.0] * n, pa.float32()),
            C.FLIP: [i % 2 == 0 for i in range(n)],
            C.LOGITS: pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), classes),
        }
    )
    d = tmp_path / "parts"
    d.mkdir()
    step = -(-n // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), d / f"part-{k:05d}.parquet")
    return table, sorted(str(p) for p in d.iterdir()), logits


def test_decode_gives_uint8_views_that_normalise_to_apply_view(tmp_path):
    table, _, logits = _rows(tmp_path, n=6, bad=(2,))
    out = DecodeViews({"x": 16, "xt": 24}, [C.LOGITS])(table)
    assert out["x"].dtype == np.uint8 and out["x"].shape == (5, 16, 16, 3)
    assert out["xt"].shape == (5, 24, 24, 3)
    keep = [0, 1, 3, 4, 5]  # row 2 is unreadable: dropped, targets stay aligned
    assert out[C.LOGITS].dtype == np.float16 and np.array_equal(out[C.LOGITS], logits[keep])
    x = normalize(torch.from_numpy(out["x"]), MEAN, STD, "cpu")
    assert x.shape == (5, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    r = table.slice(3, 1).to_pylist()[0]
    ref = apply_view(
        Image.open(r["source"]),
        ViewParams(r["x0"], r["y0"], r["x1"], r["y1"], r["flip"]),
        16,
        MEAN,
        STD,
    )
    assert torch.allclose(x[2], ref, atol=1e-5)


def test_view_stream_yields_every_row_once_per_epoch_shuffled(tmp_path):
    _, files, logits = _rows(tmp_path, n=24, files=3)
    stream = ViewStream(
        files, DecodeViews({"x": 8}, [C.LOGITS]), [C.SOURCE, C.LOGITS], decode_batch=5, seed=1
    )
    epochs = []
    for _ in range(2):
        batches = list(stream.iter_torch_batches(batch_size=5, local_shuffle_buffer_size=10))
        assert [len(b["x"]) for b in batches] == [5, 5, 5, 5, 4]
        seen = torch.cat([b[C.LOGITS] for b in batches]).numpy()
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, logits.tolist()))
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # a new order every epoch
    dropped = list(stream.iter_torch_batches(batch_size=5, drop_last=True))
    assert [len(b["x"]) for b in dropped] == [5, 5, 5, 5]


def _spec(**kw):
    cfg = load_config(
        "tiny",
        [
            "student.img_size=16",
            "train.report_every=3",
            "train.checkpoint_every=6",
            "distill.batch_size=4",
            "distill.steps=12",
            "train.shuffle_buffer=8",
        ],
    )
    return dataclasses.replace(DistillSpec.from_config(cfg, "task"), **kw)


def _distill(tmp_path, files, spec, teacher_dir="", state=None):
    sizes = {"x": spec.student_img_size}
    cols = [C.SOURCE, *C.BOX, C.FLIP]
    targets = []
    if spec.online:
        sizes["xt"] = 16
    else:
        cols.append(C.LOGITS)
        targets = [C.LOGITS]
    stream = ViewStream(files, DecodeViews(sizes, targets), cols, decode_batch=8)
    session = LocalSession("cpu", {"train": stream}, state=state)
    inputs = {
        "out_dir": str(tmp_path / "student"),
        "num_classes": 3,
        "rows": 24,
        "teacher_dir": teacher_dir,
    }
    m = run_training({"spec": dataclasses.asdict(spec), "inputs": inputs}, session)
    return m, session


@pytest.mark.slow
def test_worker_checkpoints_by_step_without_the_teacher_and_resumes_mid_epoch(tmp_path):
    from ktray.models import save_model

    _, files, _ = _rows(tmp_path)
    m, session = _distill(tmp_path, files, _spec())
    assert m["step"] == 12 and [h["step"] for h in m["history"]] == [3, 6, 9, 12]
    assert [s["step"] for s in session.states] == [6, 12]  # every checkpoint_every steps
    assert os.path.exists(tmp_path / "student" / "model.safetensors")
    # resumed from step 6 (mid-epoch: 24 rows / 4 = 6 steps per epoch ends there, so use 9)
    mid = dict(session.states[0], step=9)
    m2, _ = _distill(tmp_path, files, _spec(), state=mid)
    assert m2["resumed_from"] == 9 and m2["step"] == 12
    assert [h["step"] for h in m2["history"]] == [3, 6, 12]
    # online: the teacher runs in the loop, and no checkpoint carries it
    tcfg = load_config("tiny", ["teacher.img_size=16"])
    teacher, tspec = build_teacher(TeacherSpec.from_config(tcfg, 24), 3)
    save_model(teacher, str(tmp_path / "teacher"), tspec)
    m3, s3 = _distill(
        tmp_path,
        files,
        _spec(teacher_mode="online", steps=6),
        teacher_dir=str(tmp_path / "teacher"),
    )
    assert m3["flops"] > m["flops"] / 2  # the teacher's forward counts
    keys = list(s3.states[-1]["model"])
    assert keys and all(k.startswith("student.") for k in keys), keys[:5]


def test_no_host_sync_per_step_and_bf16_autocast_on_cpu(monkeypatch):
    import sys

    syncs = []  # device -> host reads made by the loop itself (not the optimizer's CPU steps)

    def counting(name, orig):
        def read(self, *a, **k):
            if sys._getframe(1).f_code.co_filename.endswith(os.path.join("train", "loop.py")):
                syncs.append(name)
            return orig(self, *a, **k)

        return read

    for name in ("__float__", "item", "tolist", "cpu", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    model = torch.nn.Linear(4, 2)
    seen = []

    def step(m, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        out = m(batch)
        return {"loss": out.float().pow(2).mean(), "n": len(batch), "aux": out.mean()}

    data = [torch.randn(3, 4) for _ in range(5)]
    session = LocalSession("cpu")
    train_steps(
        model,
        step,
        data,
        session,
        steps=20,
        lr=1e-2,
        weight_decay=0.0,
        report_every=10,
        checkpoint_every=10,
        precision="bf16",
    )
    assert all(seen) and len(seen) == 20
    # two reports x (loss, aux): the only reads of device values
    assert len(syncs) == 4, syncs
    assert [r["step"] for r in session.reports] == [10, 20]
    seen.clear()
    train_steps(
        model, step, data, LocalSession("cpu"), steps=2, lr=1e-2, weight_decay=0.0, precision="fp32"
    )
    assert seen == [False, False]


def test_a_workers_distillation_batches_share_the_global_batch_and_seed_their_shuffle(tmp_path):
    """shard_batches (classification and segmentation): each of N workers takes 1/N of the
    global distill.batch_size; the shuffle buffer's seed is fixed by (seed, rank, epoch)."""
    from types import SimpleNamespace

    from ktray.train.worker import shard_batches

    calls = []

    class Shard:
        def iter_torch_batches(self, **kw):
            calls.append(kw)
            return iter(())

    def session(rank, world):
        return SimpleNamespace(
            dataset=lambda name: Shard(),
            world_size=world,
            rank=rank,
            device=torch.device("cpu"),
        )

    def spec(*more):
        over = [f"out={tmp_path}", "distill.batch_size=10", "train.shuffle_buffer=8", *more]
        return DistillSpec.from_config(load_config(None, over), "task")

    two = shard_batches(session(1, 2), spec(), {"rows": 100})
    list(two), list(two)  # two epochs
    assert [c["batch_size"] for c in calls] == [5, 5]  # 10 over 2 workers
    assert calls[0]["drop_last"] and calls[0]["local_shuffle_buffer_size"] == 8
    first, second = calls[0]["local_shuffle_seed"], calls[1]["local_shuffle_seed"]
    assert first != second  # a new draw every epoch
    list(shard_batches(session(1, 2), spec(), {"rows": 100}))
    assert calls[2]["local_shuffle_seed"] == first  # the same (seed, rank, epoch): the same
    list(shard_batches(session(0, 2), spec(), {"rows": 100}))
    assert calls[3]["local_shuffle_seed"] != first  # another rank
    list(shard_batches(session(1, 2), spec("train.seed=1"), {"rows": 100}))
    assert calls[4]["local_shuffle_seed"] != first  # another seed
    list(shard_batches(session(0, 1), spec("train.reproducible=false"), {"rows": 15}))
    assert calls[5]["batch_size"] == 10 and not calls[5]["drop_last"]  # < 2 batches: keep all
    assert "local_shuffle_seed" not in calls[5]
    assert two.passes == 1
    assert shard_batches(session(0, 1), spec(), {"rows": 100, "passes": 3}).passes == 3


def test_the_epoch_count_counts_the_passes_an_iteration_of_the_loader_makes():
    """A streamed transfer set runs all its passes in one iteration of the loader
    (``train_data.view_dataset``): the loop's ``epoch`` counts passes, not iterations."""

    class Loader:
        passes = 3

        def __iter__(self):  # one iteration = 3 passes over 2 batches of 4 rows
            return iter([torch.randn(4, 4) for _ in range(6)])

    model = torch.nn.Linear(4, 2)
    session = LocalSession("cpu")
    train_steps(
        model,
        lambda m, b: {"loss": m(b).pow(2).mean(), "n": len(b)},
        Loader(),
        session,
        steps=14,
        lr=1e-2,
        weight_decay=0.0,
        report_every=7,
    )
    # step 7 in the 2nd iteration (epochs 3-5), step 14 in the 3rd (6-8)
    assert [(r["step"], r["epoch"]) for r in session.reports] == [(7, 3), (14, 6)]
