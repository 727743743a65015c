"""The run estimate printed before a pipeline starts: stage work counted from the config and
the task's rows, priced with per-image times."""

import pytest
import torch

from ktray.config import load_config
from ktray.pipeline import estimate

COSTS = estimate.Costs(
    teacher_forward=0.01, student_train=0.002, student_forward=0.0005, device="cpu"
)
ROWS = {"train": 30, "test": 100, "unlabeled": 400, "generic": 200}


def test_plan_counts_each_stage_once_with_its_work():
    cfg = load_config(
        "tiny",
        [
            "methods=[teacher,scratch,task@in_domain,features@in_domain,task@generic]",
            "teacher.mode=linear",
            "teacher.probe_views=2",
            "logits.views=3",
            "distill.steps=10",
            "distill.batch_size=8",
            "finetune.steps=5",
            "finetune.batch_size=4",
        ],
    )
    got = dict(estimate.plan(cfg, ROWS, COSTS))
    assert got["teacher (adapt + test)"] == pytest.approx((2 * 30 + 100) * 0.01)
    # one logits pass per transfer set, shared by the methods on it
    assert got["logits[in_domain]"] == pytest.approx(400 * 3 * 0.01)
    assert got["logits[generic]"] == pytest.approx(200 * 3 * 0.01)
    assert got["distill[task@in_domain]"] == pytest.approx(10 * 8 * 0.002 + 100 * 0.0005)
    assert got["finetune[task@generic]"] == pytest.approx(5 * 4 * 0.002 + 100 * 0.0005)
    assert "distill[scratch]" not in got and "finetune[scratch]" in got
    assert len(got) == 1 + 2 + 3 + 4  # teacher, 2 logits, 3 distill, 4 finetune


def test_online_teacher_is_priced_per_step_and_runs_no_logits_pass():
    cfg = load_config(
        "tiny",
        [
            "methods=[task@in_domain]",
            "distill.teacher_mode=online",
            "distill.steps=10",
            "distill.batch_size=8",
        ],
    )
    got = dict(estimate.plan(cfg, ROWS, COSTS))
    assert not any(k.startswith("logits") for k in got)
    assert got["distill[task@in_domain]"] == pytest.approx(10 * 8 * (0.002 + 0.01) + 100 * 0.0005)


def test_describe_measures_tiny_models_and_prints_a_total():
    cfg = load_config("tiny", ["methods=[teacher,scratch]"])
    text = estimate.describe(cfg, ROWS, num_classes=3)
    lines = text.splitlines()
    assert lines[0].startswith("estimate: ~") and "cpu" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["teacher", "finetune[scratch]"]


def test_curation_embeds_the_default_gallery_and_sizes_the_curated_set():
    cfg = load_config(
        "tiny",
        [
            "methods=[task@curated]",
            "curate.grid=1",
            "curate.scales=[0.6]",
            "curate.images_per_query=5",
            "logits.views=1",
        ],
    )
    got = dict(estimate.plan(cfg, ROWS, COSTS))
    crops = 2  # the full image + one crop
    assert got["curate (embed gallery crops)"] == pytest.approx(
        ((400 + 200) * crops + (30 + 100) * crops) * 0.01
    )
    assert got["logits[curated]"] == pytest.approx(5 * 30 * 0.01)


def test_curation_is_priced_with_its_own_encoder():
    """curate.encoder at curate.img_size, not the teacher at its size (the demo's Lite0 @48
    embeds its gallery far faster than the Lite2 @80 teacher would)."""
    cfg = load_config("tiny", ["methods=[task@curated]", "curate.grid=1", "curate.scales=[0.6]"])
    costs = estimate.Costs(
        teacher_forward=0.01,
        student_train=0.002,
        student_forward=0.0005,
        device="cpu",
        encoder_forward=0.001,
    )
    got = dict(estimate.plan(cfg, ROWS, costs))
    assert got["curate (embed gallery crops)"] == pytest.approx(
        ((400 + 200) * 2 + (30 + 100) * 2) * 0.001
    )
    views = cfg.logits.views
    assert got["logits[curated]"] == pytest.approx(cfg.curate.images_per_query * 30 * views * 0.01)


def test_measured_costs_train_the_student_as_the_workers_do(monkeypatch):
    """The student is timed in channels_last (as the workers train it: a contiguous model fed
    channels_last images takes a slow mixed-format path) and the encoder is measured when a
    curated transfer set is used."""
    seen = []
    real = estimate._per_image

    def spy(fn, x, repeats):
        seen.append((x.shape[-1], x.is_contiguous(memory_format=torch.channels_last)))
        return real(fn, x, repeats)

    monkeypatch.setattr(estimate, "_per_image", spy)
    cfg = load_config("tiny", ["methods=[task@curated]", "curate.img_size=48"])
    costs = estimate.measure_costs(cfg, num_classes=3)
    assert costs.encoder_forward is not None and costs.encoder_forward > 0
    assert seen[-1][0] == 48  # the encoder at curate.img_size
    from ktray.models.student import create_student

    calls = {}
    real_create = create_student

    def create(*a, **kw):
        m = real_create(*a, **kw)
        calls["student"] = m
        return m

    monkeypatch.setattr("ktray.models.student.create_student", create)
    estimate.measure_costs(cfg, num_classes=3)
    w = next(p for p in calls["student"].parameters() if p.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_segmentation_runs_are_priced_with_the_dense_models(monkeypatch):
    """A segmentation run's estimate times the dense teacher and the dense student (decoder
    included), the classes reduced over axis 1 of the [B, C, h, w] logits."""
    from ktray.models import dense

    built, losses = {}, []
    real_student, real_teacher = dense.DenseStudent, dense.build_dense_teacher

    def student(*a, **kw):
        built["student"] = real_student(*a, **kw)
        return built["student"]

    def teacher(*a, **kw):
        built["teacher"] = real_teacher(*a, **kw)
        return built["teacher"]

    real_lse = torch.Tensor.logsumexp

    def lse(self, dim, *a, **kw):
        losses.append((self.dim(), dim))
        return real_lse(self, dim, *a, **kw)

    monkeypatch.setattr(dense, "DenseStudent", student)
    monkeypatch.setattr(dense, "build_dense_teacher", teacher)
    monkeypatch.setattr(torch.Tensor, "logsumexp", lse)
    cfg = load_config(
        "demo_segmentation",
        [
            "teacher.backbone=test_resnet",
            "teacher.img_size=32",
            "student.arch=test_resnet",
            "student.img_size=32",
            "distill.batch_size=4",
            "eval_batch_size=4",
        ],
    )
    costs = estimate.measure_costs(cfg, num_classes=5, segmentation=True)
    assert built["student"].head_kind == "fpn" and built["teacher"].num_classes == 5
    assert (4, 1) in losses  # [B, C, h, w] reduced over classes
    assert costs.teacher_forward > 0 and costs.student_train > 0
    text = estimate.describe(
        cfg, {"train": 40, "test": 100, "unlabeled": 200}, num_classes=5, segmentation=True
    )
    assert [ln.split()[0] for ln in text.splitlines()[1:]] == [
        "teacher",
        "logits[in_domain]",
        "finetune[scratch]",
        "distill[features@in_domain]",
        "finetune[features@in_domain]",
        "distill[task@in_domain]",
        "finetune[task@in_domain]",
    ]
