"""Dense distillation for segmentation: per-pixel KD and dense feature matching (no ray).

``objective=task``: per-pixel ``KL(softmax(t/T) || softmax(s/T)) * T^2`` between the teacher's
stored predictions ``[B, C, s, s]`` (``logits.dense_size``) and the student's logits resized
(bilinear) to the same grid, averaged over pixels. ``objective=features`` (the task-agnostic
baseline): the student's decoder features, projected by a learned 1x1 conv and average-pooled
to the stored grid, match the teacher's dense backbone features ``[B, D, f, f]`` by
per-location cosine (or MSE). Targets come precomputed (the logits stage) or from an online
teacher run on the same view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ktray.errors import KtrayError
from ktray.models.dense import dense_targets

__all__ = ["dense_kd_loss", "dense_feature_loss", "DenseDistillModule"]


def dense_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-pixel Hinton KD averaged over batch and pixels; the student's ``[B, C, h, w]`` are
    resized (bilinear) to the teacher's grid first.

    Raises:
        KtrayError: Not 4-d, or batch / class counts differ, or a non-positive temperature.
    """
    if student_logits.ndim != 4 or teacher_logits.ndim != 4:
        raise KtrayError(
            f"dense KD expects [B, C, H, W] tensors, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise KtrayError(
            f"dense KD: student {tuple(student_logits.shape[:2])} and teacher "
            f"{tuple(teacher_logits.shape[:2])} differ in batch or class count"
        )
    t = float(temperature)
    if not t > 0:
        raise KtrayError(f"temperature must be positive, got {temperature}")
    s = student_logits.float()
    if s.shape[-2:] != teacher_logits.shape[-2:]:
        s = F.interpolate(s, size=teacher_logits.shape[-2:], mode="bilinear", align_corners=False)
    log_p = F.log_softmax(s / t, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1)  # [B, h, w]
    return kl.mean() * t * t


def dense_feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss: str = "cosine"
) -> torch.Tensor:
    """``[B, D, f, f]`` maps: 1 - per-location cosine (``cosine``) or mean squared error of
    L2-normalised vectors (``mse``), averaged."""
    if student.shape != teacher.shape:
        raise KtrayError(
            f"dense features: student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)} differ"
        )
    s, t = student.float(), teacher.float()
    if loss == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=1)).mean()
    if loss == "mse":
        return F.mse_loss(F.normalize(s, dim=1), F.normalize(t, dim=1))
    raise KtrayError(f"dense feature loss must be cosine or mse, got {loss!r}")


class _DenseNet(nn.Module):
    """What trains: the student (+ the 1x1 projector for the features objective)."""

    def __init__(self, student: nn.Module, objective: str, projector: nn.Module | None):
        super().__init__()
        self.student, self.projector, self.objective = student, projector, objective
        if objective == "features":
            student.classifier.requires_grad_(False)  # never run: no gradient

    def forward(self, x: torch.Tensor, feature_size: int = 0) -> torch.Tensor:
        if self.objective == "task":
            return self.student(x)
        _, feats = self.student.forward_all(x)
        return F.adaptive_avg_pool2d(self.projector(feats), feature_size)


class DenseDistillModule(nn.Module):
    """Student + optional frozen dense teacher + the dense loss of one objective."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        objective: str = "task",
        temperature: float = 1.0,
        feature_loss: str = "cosine",
        teacher_dim: int = 0,
        dense_size: int = 16,
        feature_size: int = 8,
    ):
        super().__init__()
        if objective not in ("task", "features"):
            raise KtrayError(f"unknown distill objective {objective!r}")
        projector = None
        if objective == "features":
            if not teacher_dim:
                raise KtrayError("features objective needs the teacher's feature width")
            projector = nn.Conv2d(student.feature_dim, int(teacher_dim), 1)
        self.net = _DenseNet(student, objective, projector)
        self.teacher, self.objective = teacher, objective
        self.temperature, self.feature_loss = float(temperature), feature_loss
        self.dense_size, self.feature_size = int(dense_size), int(feature_size)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._teacher_dtype = None

    def wrap_net(self, wrap) -> DenseDistillModule:
        self.net = wrap(self.net)
        return self

    def teacher_bf16(self) -> None:
        if self.teacher is not None:
            self.teacher.to(torch.bfloat16)
            self._teacher_dtype = torch.bfloat16

    def train(self, mode: bool = True) -> DenseDistillModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(
        self,
        x_student: torch.Tensor,
        x_teacher: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        target = teacher_logits if self.objective == "task" else teacher_features
        if target is None:
            if self.teacher is None or x_teacher is None:
                raise KtrayError("dense distillation needs stored targets or an online teacher")
            with torch.inference_mode():
                xt = x_teacher.to(self._teacher_dtype) if self._teacher_dtype else x_teacher
                logits, feats = dense_targets(
                    self.teacher,
                    xt,
                    self.dense_size,
                    self.feature_size if self.objective == "features" else 0,
                )
            target = (logits if self.objective == "task" else feats).float().clone()
        target = target.detach().float()
        if self.objective == "task":
            out = self.net(x_student)
            loss = dense_kd_loss(out, target, self.temperature)
            s = F.interpolate(
                out.detach().float(), size=target.shape[-2:], mode="bilinear", align_corners=False
            )
            agree = (s.argmax(1) == target.argmax(1)).float().mean()
            return {"loss": loss, "kd": loss.detach(), "agree": agree}
        out = self.net(x_student, target.shape[-1])
        loss = dense_feature_loss(out, target, self.feature_loss)
        return {"loss": loss, "feat": loss.detach()}
