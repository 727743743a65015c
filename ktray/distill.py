"""Distillation as one module: student, optional frozen teacher, optional projector, loss.

Modelled on timm's ``timm/task/distillation.py`` and open_clip's ``distill_task.py``: a single
``nn.Module`` whose ``forward`` returns a dict of losses, so a training loop only ever calls
``out = module(...); out["loss"].backward()``.

Teacher targets come either precomputed (the ``logits`` stage wrote them to Parquet for the
exact view the student sees) or online: the frozen teacher runs under ``torch.no_grad`` on
``x_teacher``, the same crop box resized to the teacher's input size. Both paths give the same
loss for the same view.

DDP: wrap the whole ``DistillModule``. The teacher's parameters and buffers (and, for the
features objective, the student's unused classifier) are registered as DDP-ignored, so DDP
neither broadcasts nor all-reduces them and no ``find_unused_parameters`` is needed.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn as nn

from ktray.errors import KtrayError
from ktray.losses import FEATURE_LOSSES, KD_LOSSES

__all__ = ["OBJECTIVES", "DEFAULT_LOSS", "DistillModule"]

OBJECTIVES = ("task", "features")
"""``task``: match the adapted teacher's predictions (task-oriented transfer).
``features``: match the teacher backbone's features (task-agnostic baseline)."""

DEFAULT_LOSS = {"task": "kl", "features": "cosine"}


class DistillModule(nn.Module):
    """Student + frozen teacher + loss for one distillation objective.

    Args:
        student: a timm model (``forward_features`` / ``forward_head(pre_logits=True)``);
            for ``task`` any module whose ``forward(x)`` gives [B, C] logits works.
        teacher: optional module with ``forward_all(x) -> (logits [B, C], features [B, D])``,
            e.g. ``ktray.models.heads.TaskModel``. Frozen and kept in eval mode. Leave it out
            when every batch brings precomputed teacher targets.
        objective: ``task`` or ``features``.
        loss: a name from ``KD_LOSSES`` (task) or ``FEATURE_LOSSES`` (features); default
            ``kl`` / ``cosine``.
        temperature: passed to the loss; None keeps the loss's own default (1.0 for KD,
            0.1 for contrastive; cosine and mse ignore it).
        projector: optional module mapping student features [B, Ds] to [B, Dt] (features
            objective only), e.g. ``ktray.losses.FeatureProjector``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module] = None,
        *,
        objective: str = "task",
        loss: Optional[str] = None,
        temperature: Optional[float] = None,
        projector: Optional[nn.Module] = None,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise KtrayError(
                f"unknown distill objective {objective!r}; choose one of {list(OBJECTIVES)}"
            )
        self.objective = objective
        self.loss_name = loss or DEFAULT_LOSS[objective]
        table = KD_LOSSES if objective == "task" else FEATURE_LOSSES
        self.loss_fn = table[self.loss_name]  # unknown name -> KtrayError listing valid ones
        self.temperature = None if temperature is None else float(temperature)
        if objective == "task" and projector is not None:
            raise KtrayError("a feature projector only applies to objective 'features'")
        if objective == "features":
            for method in ("forward_features", "forward_head"):
                if not callable(getattr(student, method, None)):
                    raise KtrayError(
                        f"objective 'features' needs a timm-style student with {method}(); "
                        f"got {type(student).__name__}"
                    )
        if teacher is not None and not callable(getattr(teacher, "forward_all", None)):
            raise KtrayError(
                f"teacher {type(teacher).__name__} has no forward_all(x) -> (logits, features)"
            )

        self.student = student
        self.projector = projector
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._register_ddp_ignored()

    # -- parameters -------------------------------------------------------------------------

    def _unused_student_head(self) -> list[nn.Parameter]:
        """The student's classifier, which the features objective never runs."""
        get_classifier = getattr(self.student, "get_classifier", None)
        if self.objective != "features" or not callable(get_classifier):
            return []
        head = get_classifier()
        return list(head.parameters()) if isinstance(head, nn.Module) else []

    def _register_ddp_ignored(self) -> None:
        unused = {id(p) for p in self._unused_student_head()}
        names = [n for n, p in self.named_parameters() if id(p) in unused]
        if self.teacher is not None:
            names += [f"teacher.{n}" for n, _ in self.teacher.named_parameters()]
            names += [f"teacher.{n}" for n, _ in self.teacher.named_buffers()]
        if names:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, names
            )

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should update: student (+ projector), never the teacher.

        For the features objective the student's classifier is left out: it gets no gradient.
        """
        skip = {id(p) for p in self._unused_student_head()}
        modules = [self.student] + ([self.projector] if self.projector is not None else [])
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in skip:
                    yield p

    def train(self, mode: bool = True) -> "DistillModule":
        """Switch student/projector mode; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- forward ----------------------------------------------------------------------------

    def student_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits student features [B, Ds] (timm ``forward_head(pre_logits=True)``)."""
        return self.student.forward_head(self.student.forward_features(x), pre_logits=True)

    def _teacher_target(
        self,
        x_teacher: Optional[torch.Tensor],
        teacher_logits: Optional[torch.Tensor],
        teacher_features: Optional[torch.Tensor],
    ) -> torch.Tensor:
        precomputed = teacher_logits if self.objective == "task" else teacher_features
        if precomputed is not None:
            return precomputed.detach()
        kind = "teacher_logits" if self.objective == "task" else "teacher_features"
        if self.teacher is None:
            raise KtrayError(f"objective {self.objective!r} needs {kind} or an online teacher")
        if x_teacher is None:
            raise KtrayError(
                f"online teacher needs x_teacher (the view at the teacher's size) or {kind}"
            )
        with torch.no_grad():
            logits, features = self.teacher.forward_all(x_teacher)
        return logits if self.objective == "task" else features

    def _loss(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.temperature is None:
            return self.loss_fn(student, target)
        return self.loss_fn(student, target, self.temperature)

    def forward(
        self,
        x_student: torch.Tensor,
        x_teacher: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_features: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """One distillation step's losses.

        Args:
            x_student: [B, 3, Hs, Ws] the view at the student's input size.
            x_teacher: [B, 3, Ht, Wt] the same view at the teacher's input size (online only).
            teacher_logits: [B, C] precomputed teacher predictions (task objective).
            teacher_features: [B, D] precomputed teacher features (features objective).

        Returns:
            ``task``: ``{"loss", "kd", "agree"}`` where ``kd`` is the detached loss and
            ``agree`` the fraction of rows where student and teacher top-1 classes agree.
            ``features``: ``{"loss", "feat"}`` with ``feat`` the detached loss.
        """
        target = self._teacher_target(x_teacher, teacher_logits, teacher_features)
        if self.objective == "task":
            # The plain forward keeps the student's head dropout; only logits are needed here.
            logits = self.student(x_student)
            loss = self._loss(logits, target)
            agree = (logits.detach().argmax(-1) == target.argmax(-1)).float().mean()
            return {"loss": loss, "kd": loss.detach(), "agree": agree}
        feats = self.student_features(x_student)
        if self.projector is not None:
            feats = self.projector(feats)
        loss = self._loss(feats, target)
        return {"loss": loss, "feat": loss.detach()}
