"""Distillation losses: KD on task predictions and feature matching on VFM embeddings.

Task-oriented transfer matches the student's task predictions to the adapted teacher's
(``kd_loss``); task-agnostic transfer matches the student's (projected) pooled features to the
teacher's backbone features (``feature_loss``). The paper does not publish either loss; the
defaults here are the usual choices (KL with temperature; cosine) and every loss is chosen by
name from :data:`LOSSES` so configs record which one ran.

Every loss takes ``(student, teacher, temperature)`` and returns a scalar. Inputs are cast to
float32 first so a bf16/fp16 autocast forward still gets a stable softmax and norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ktray.errors import KtrayError

__all__ = [
    "kd_loss",
    "soft_cross_entropy",
    "feature_loss",
    "cosine_loss",
    "mse_loss",
    "contrastive_loss",
    "FeatureProjector",
    "KD_LOSSES",
    "FEATURE_LOSSES",
    "LOSSES",
    "get_loss",
]


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str, shape: str) -> None:
    if student.ndim != 2 or teacher.ndim != 2:
        raise KtrayError(
            f"{what}: expected {shape} tensors, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise KtrayError(
            f"{what}: batch size mismatch, student has {student.shape[0]} rows and teacher "
            f"{teacher.shape[0]}"
        )
    if student.shape[0] == 0:
        raise KtrayError(f"{what}: empty batch")


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise KtrayError(f"temperature must be a positive number, got {temperature}")
    return temperature


def _check_classes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    _check_pair(student_logits, teacher_logits, "logits", "[B, C]")
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise KtrayError(
            f"class count mismatch: student predicts {student_logits.shape[1]} classes, "
            f"teacher {teacher_logits.shape[1]}"
        )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton KD: ``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the batch.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures. Both sides go
    through ``log_softmax`` (never ``log(softmax)``) so large logits do not overflow.

    Args:
        student_logits: [B, C] student predictions.
        teacher_logits: [B, C] teacher predictions (targets; no gradient flows into them).
        temperature: softmax temperature T > 0.

    Returns:
        Scalar float32 loss, zero iff the two softened distributions agree on every row.
    """
    _check_classes(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Cross-entropy against the teacher's softened distribution, times ``T^2``.

    Equals :func:`kd_loss` plus the teacher's entropy (a constant in the student), so the
    gradients are identical; the value does not go to zero, which makes ``kd_loss`` the
    better number to log.

    Args:
        student_logits: [B, C].
        teacher_logits: [B, C].
        temperature: softmax temperature T > 0.
    """
    _check_classes(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    p_teacher = F.softmax(teacher_logits.detach().float() / t, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    return -(p_teacher * log_p_student).sum(dim=-1).mean() * (t * t)


def _check_features(student_proj: torch.Tensor, teacher_feat: torch.Tensor) -> None:
    _check_pair(student_proj, teacher_feat, "features", "[B, D]")
    if student_proj.shape[1] != teacher_feat.shape[1]:
        raise KtrayError(
            f"feature dimension mismatch: student gives {student_proj.shape[1]}, teacher "
            f"{teacher_feat.shape[1]}; add a FeatureProjector"
        )


def cosine_loss(
    student_proj: torch.Tensor, teacher_feat: torch.Tensor, temperature: float | None = None
) -> torch.Tensor:
    """``mean(1 - cos(s, t))`` over the batch: 0 aligned, 1 orthogonal, 2 opposite.

    Args:
        student_proj: [B, D] projected student features.
        teacher_feat: [B, D] teacher features.
        temperature: unused (accepted so every loss has the same signature).
    """
    _check_features(student_proj, teacher_feat)
    cos = F.cosine_similarity(student_proj.float(), teacher_feat.detach().float(), dim=-1)
    return (1.0 - cos).mean()


def mse_loss(
    student_proj: torch.Tensor, teacher_feat: torch.Tensor, temperature: float | None = None
) -> torch.Tensor:
    """Plain mean squared error on the raw (unnormalised) features, averaged over B*D.

    Raw features keep the teacher's feature scale as part of the target; use ``cosine`` when
    only direction should be matched.

    Args:
        student_proj: [B, D].
        teacher_feat: [B, D].
        temperature: unused.
    """
    _check_features(student_proj, teacher_feat)
    return F.mse_loss(student_proj.float(), teacher_feat.detach().float())


def contrastive_loss(
    student_proj: torch.Tensor, teacher_feat: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP-style) between the batch's student and teacher features.

    Row i of the student must pick row i of the teacher among the B teacher rows and vice
    versa; logits are cosine similarities divided by ``temperature``. The negatives are the
    other images of the local batch only (no cross-worker gather), so the loss depends on the
    per-worker batch size. Constant features give exactly ``log(B)``.

    Args:
        student_proj: [B, D].
        teacher_feat: [B, D].
        temperature: similarity temperature > 0.
    """
    _check_features(student_proj, teacher_feat)
    t = _check_temperature(temperature)
    s = F.normalize(student_proj.float(), dim=-1)
    f = F.normalize(teacher_feat.detach().float(), dim=-1)
    logits = s @ f.t() / t
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class _LossTable(dict):
    """A name -> loss dict whose missing keys raise a one-line KtrayError naming valid ones."""

    def __init__(self, kind: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = kind

    def __missing__(self, name):
        raise KtrayError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}")


LossFn = Callable[..., torch.Tensor]

KD_LOSSES: dict[str, LossFn] = _LossTable("kd loss", {"kl": kd_loss, "soft_ce": soft_cross_entropy})
"""Losses on task predictions (objective ``task``)."""

FEATURE_LOSSES: dict[str, LossFn] = _LossTable(
    "feature loss", {"cosine": cosine_loss, "mse": mse_loss, "contrastive": contrastive_loss}
)
"""Losses on features (objective ``features``)."""

LOSSES: dict[str, LossFn] = _LossTable("loss", {**KD_LOSSES, **FEATURE_LOSSES})
"""Every loss by name; ``LOSSES[name]`` on an unknown name raises :class:`KtrayError`."""


def get_loss(name: str) -> LossFn:
    """Look up a loss by name; an unknown name raises a KtrayError listing the valid ones."""
    return LOSSES[name]


def feature_loss(
    student_proj: torch.Tensor,
    teacher_feat: torch.Tensor,
    kind: str = "cosine",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Feature-matching loss by name: ``cosine``, ``mse`` or ``contrastive``.

    Args:
        student_proj: [B, D] projected student features.
        teacher_feat: [B, D] teacher features.
        kind: one of :data:`FEATURE_LOSSES`.
        temperature: used by ``contrastive`` only.
    """
    return FEATURE_LOSSES[kind](student_proj, teacher_feat, temperature)


class FeatureProjector(nn.Module):
    """Maps student pooled features [B, Ds] to the teacher's feature space [B, Dt].

    A single Linear by default; ``hidden_dim`` makes it Linear-GELU-Linear. It exists only for
    the task-agnostic (features) objective and is dropped after pretraining.

    Args:
        student_dim: Ds, e.g. ``student.num_features`` for a timm model.
        teacher_dim: Dt, the teacher backbone's feature width.
        hidden_dim: hidden width of the 2-layer MLP; None for a single Linear.
    """

    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int | None = None):
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if int(value) <= 0:
                raise KtrayError(f"FeatureProjector {name} must be positive, got {value}")
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        if hidden_dim is None:
            self.net = nn.Linear(self.student_dim, self.teacher_dim)
        else:
            if int(hidden_dim) <= 0:
                raise KtrayError(f"FeatureProjector hidden_dim must be positive, got {hidden_dim}")
            self.net = nn.Sequential(
                nn.Linear(self.student_dim, int(hidden_dim)),
                nn.GELU(),
                nn.Linear(int(hidden_dim), self.teacher_dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Ds] -> [B, Dt]."""
        return self.net(x)
