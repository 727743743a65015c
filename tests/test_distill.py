"""DistillModule with a tiny timm student and a stand-in teacher exposing forward_all."""

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ktray.distill import DistillModule
from ktray.errors import KtrayError
from ktray.losses import FeatureProjector

NUM_CLASSES, TEACHER_DIM = 5, 24


class TinyTeacher(nn.Module):
    """Stand-in for ktray.models.heads.TaskModel: forward_all(x) -> (logits, features).

    BatchNorm and Dropout make the output depend on train/eval mode, so a teacher that slipped
    out of eval mode would break the online == precomputed check.
    """

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, TEACHER_DIM, 3, stride=2, padding=1),
            nn.BatchNorm2d(TEACHER_DIM),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(TEACHER_DIM, NUM_CLASSES)

    def forward_all(self, x):
        feats = self.backbone(x)
        return self.head(self.drop(feats)), feats

    def forward(self, x):
        return self.forward_all(x)[0]


def make_student():
    return timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)


def make_batch(seed=0, b=8):
    g = torch.Generator().manual_seed(seed)
    x_student = torch.randn(b, 3, 32, 32, generator=g)
    # the same view at the teacher's (different) input size
    x_teacher = F.interpolate(x_student, size=(48, 48), mode="bilinear", align_corners=False)
    return x_student, x_teacher


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    t = TinyTeacher()
    t.head.weight.data.mul_(10)  # peaked teacher predictions make the KD target non-trivial
    return t


@pytest.mark.parametrize("loss", ["kl", "soft_ce"])
def test_online_and_precomputed_teacher_give_same_loss(teacher, loss):
    torch.manual_seed(0)
    dm = DistillModule(make_student(), teacher, objective="task", loss=loss, temperature=2.0)
    dm.train()
    xs, xt = make_batch()
    with torch.no_grad():
        logits, _ = teacher.forward_all(xt)  # the logits stage would store exactly these
    online = dm(xs, x_teacher=xt)
    pre = dm(xs, teacher_logits=logits)
    assert set(online) == {"loss", "kd", "agree"}
    assert online["loss"].item() == pytest.approx(pre["loss"].item(), abs=1e-6)
    # precomputed targets win over the online teacher when both are given
    both = dm(xs, x_teacher=xt + 1.0, teacher_logits=logits)
    assert both["loss"].item() == pytest.approx(pre["loss"].item(), abs=1e-6)


def test_features_online_and_precomputed_match(teacher):
    dm = DistillModule(
        make_student(),
        teacher,
        objective="features",
        loss="contrastive",
        projector=FeatureProjector(96, TEACHER_DIM),
    )
    xs, xt = make_batch()
    with torch.no_grad():
        _, feats = teacher.forward_all(xt)
    assert dm(xs, x_teacher=xt)["loss"].item() == pytest.approx(
        dm(xs, teacher_features=feats)["loss"].item(), abs=1e-6
    )


def test_teacher_frozen_and_kept_in_eval(teacher):
    dm = DistillModule(make_student(), teacher)
    dm.train()
    assert dm.student.training and not dm.teacher.training
    assert not any(m.training for m in dm.teacher.modules())
    assert all(not p.requires_grad for p in dm.teacher.parameters())
    xs, xt = make_batch()
    dm(xs, x_teacher=xt)["loss"].backward()
    assert all(p.grad is None for p in dm.teacher.parameters())
    assert any(p.grad is not None for p in dm.student.parameters())
    teacher_ids = {id(p) for p in dm.teacher.parameters()}
    trainable = list(dm.trainable_parameters())
    assert trainable and not any(id(p) in teacher_ids for p in trainable)
    assert len(trainable) == len(list(dm.student.parameters()))
    dm.eval()
    assert not dm.student.training and not dm.teacher.training


def test_task_kd_loss_goes_down(teacher):
    torch.manual_seed(0)
    dm = DistillModule(make_student(), teacher, objective="task", temperature=2.0)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=3e-3)
    xs, xt = make_batch()
    dm.train()
    losses = []
    for _ in range(15):
        out = dm(xs, x_teacher=xt)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["kd"].item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_features_objective_with_projector_goes_down(teacher):
    torch.manual_seed(0)
    student = make_student()
    projector = FeatureProjector(student.num_features, TEACHER_DIM, hidden_dim=32)
    dm = DistillModule(student, teacher, objective="features", loss="cosine", projector=projector)
    trainable = {id(p) for p in dm.trainable_parameters()}
    assert all(id(p) in trainable for p in projector.parameters())
    # the classifier is unused by the features objective and left out of the optimizer
    assert not any(id(p) in trainable for p in student.get_classifier().parameters())
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=3e-3)
    xs, xt = make_batch()
    losses = []
    for _ in range(15):
        out = dm(xs, x_teacher=xt)
        assert set(out) == {"loss", "feat"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["feat"].item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_ddp_wraps_only_the_student_and_projector(teacher, tmp_path):
    """DDP without find_unused_parameters over the trained part only: the teacher stays
    outside, and the features objective's unused classifier is frozen (DDP would otherwise
    wait forever for its gradient, or raise at the second step)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    student = make_student()
    dm = DistillModule(
        student, teacher, objective="features", projector=FeatureProjector(96, TEACHER_DIM)
    )
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        dm.wrap_net(DDP)
        assert isinstance(dm.net, DDP) and not isinstance(dm.teacher, DDP)
        ddp_params = {id(p) for p in dm.net.parameters() if p.requires_grad}
        assert not ddp_params & {id(p) for p in teacher.parameters()}
        assert not ddp_params & {id(p) for p in student.get_classifier().parameters()}
        assert dm.student is student  # the unwrapped student stays reachable
        opt = torch.optim.SGD(dm.trainable_parameters(), lr=0.1)
        xs, xt = make_batch()
        before = teacher.head.weight.clone()
        for _ in range(3):
            opt.zero_grad()
            dm(xs, x_teacher=xt)["loss"].backward()
            opt.step()
        assert torch.equal(teacher.head.weight, before)
    finally:
        dist.destroy_process_group()


def test_online_teacher_in_bf16_gives_bf16_close_targets(teacher):
    """teacher_bf16(): the online teacher's weights in bf16, targets close to fp32's and
    usable by the loss's backward (cloned out of inference mode)."""
    dm = DistillModule(make_student(), teacher, objective="task", temperature=2.0)
    xs, xt = make_batch()
    with torch.no_grad():
        ref, _ = teacher.forward_all(xt)
    dm.teacher_bf16()
    assert teacher.head.weight.dtype == torch.bfloat16
    target = dm._teacher_target(xt, None, None)
    assert target.dtype == torch.float32 and not target.is_inference()
    assert torch.allclose(target, ref, atol=0.25, rtol=0.05)
    dm(xs, x_teacher=xt)["loss"].backward()


def test_errors(teacher):
    student = make_student()
    xs, xt = make_batch()
    with pytest.raises(KtrayError, match="unknown distill objective"):
        DistillModule(student, teacher, objective="logits")
    with pytest.raises(KtrayError, match=r"unknown kd loss 'cosine'"):
        DistillModule(student, teacher, objective="task", loss="cosine")
    with pytest.raises(KtrayError, match="forward_all"):
        DistillModule(student, nn.Linear(2, 2))
    with pytest.raises(KtrayError, match="projector only applies"):
        DistillModule(student, teacher, projector=FeatureProjector(96, TEACHER_DIM))
    with pytest.raises(KtrayError, match="needs teacher_logits or an online teacher"):
        DistillModule(student)(xs)
    with pytest.raises(KtrayError, match="needs x_teacher"):
        DistillModule(student, teacher)(xs)
    with pytest.raises(KtrayError, match="class count mismatch"):
        DistillModule(student)(xs, teacher_logits=torch.zeros(8, 3))
    with pytest.raises(KtrayError, match="add a FeatureProjector"):
        DistillModule(student, teacher, objective="features")(xs, x_teacher=xt)


def test_library_does_not_import_ray():
    code = (
        "import sys, ktray.losses, ktray.distill, ktray.metrics; "
        "sys.exit(1 if 'ray' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_fresh_views_are_new_each_call_and_shared_by_teacher_and_student(tmp_path):
    """DecodeViews(fresh_scale=...): every call cuts new views (new epochs, new views), and
    the teacher's larger view is the same crop as the student's."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from ktray.data.decode import DecodeViews

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):  # smooth random images: crops differ, resizing keeps them alike
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        p = str(tmp_path / f"{i}.png")
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(p)
        paths.append(p)
    batch = pa.table({"source": paths})
    decode = DecodeViews({"x": 16, "xt": 32}, fresh_scale=(0.2, 0.5))
    a, b = decode(batch), decode(batch)
    assert a["x"].shape == (6, 16, 16, 3) and a["xt"].shape == (6, 32, 32, 3)
    assert np.abs(a["x"].astype(int) - b["x"].astype(int)).mean() > 10  # new views

    def shrink(v):
        return np.stack([np.asarray(Image.fromarray(im).resize((16, 16))) for im in v]).astype(int)

    same = np.abs(shrink(a["xt"]) - a["x"].astype(int)).mean()
    other = np.abs(shrink(b["xt"]) - a["x"].astype(int)).mean()
    assert same < 6 and other > 3 * same, (same, other)
    stored = DecodeViews({"x": 16})  # no fresh_scale: the stored (here: full) views, fixed
    assert np.array_equal(stored(batch)["x"], stored(batch)["x"])


def test_mixup_mixes_teacher_and_student_views_alike():
    import torch

    from ktray.distill import mix_views

    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4)
    xt = 2 * torch.nn.functional.interpolate(x, size=8)  # the teacher's view of the same images
    mx, mxt = mix_views(x, xt, alpha=0.4)
    assert not torch.allclose(mx, x)
    assert torch.allclose(mxt, 2 * torch.nn.functional.interpolate(mx, size=8), atol=1e-5)


def test_eta_text():
    from ktray.train.loop import eta_text

    assert [eta_text(s) for s in (0, 12.4, 59.6, 185, 3725, -3)] == [
        "ETA 0s",
        "ETA 12s",
        "ETA 1m00s",
        "ETA 3m05s",
        "ETA 1h02m",
        "ETA 0s",
    ]
