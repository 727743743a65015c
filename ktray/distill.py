"""Distillation as one module: student, optional frozen teacher, optional projector, loss.

Modelled on timm's ``timm/task/distillation.py`` and open_clip's ``distill_task.py``: a single
``nn.Module`` whose ``forward`` returns a dict of losses, so a training loop only ever calls
``out = module(...); out["loss"].backward()``.

Teacher targets come either precomputed (the ``logits`` stage wrote them to Parquet for the
exact view the student sees) or online: the frozen teacher runs under ``torch.no_grad`` on
``x_teacher``, the same crop box resized to the teacher's input size. Both paths give the same
loss for the same view.

DDP: wrap only what trains. ``DistillModule.net`` (:class:`StudentNet`: the student and, for
the features objective, the projector) is the one submodule handed to DDP
(:meth:`DistillModule.wrap_net`); the frozen teacher stays outside it, so DDP neither
broadcasts nor all-reduces it. The features objective never runs the student's classifier,
so :class:`StudentNet` freezes it: every parameter DDP sees gets a gradient and no
``find_unused_parameters`` is needed.

The online teacher runs under ``torch.inference_mode`` (in bf16 when
:meth:`DistillModule.teacher_bf16` was called); its targets are cloned out of inference mode
so the loss can save them for backward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from ktray.errors import KtrayError
from ktray.losses import FEATURE_LOSSES, KD_LOSSES

__all__ = ["OBJECTIVES", "DEFAULT_LOSS", "DistillModule", "StudentNet", "mix_views"]

OBJECTIVES = ("task", "features")
"""``task``: match the adapted teacher's predictions (task-oriented transfer).
``features``: match the teacher backbone's features (task-agnostic baseline)."""

DEFAULT_LOSS = {"task": "kl", "features": "cosine"}

TEACHER_MODES = ("precomputed", "online")
"""Where the teacher's targets come from: the logits stage's table, or the teacher run on the
same view during distillation."""

AUGMENTS = ("stored", "consistent")
"""The views distillation trains on: the stored views (``logits.views`` per image, the same
every epoch), or ``consistent`` fresh random views drawn at every step, the same view for
teacher and student (online teacher only; "function matching", Beyer et al. 2022)."""


def mix_views(
    x: torch.Tensor, xt: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a batch's student views ``x`` and teacher views ``xt`` with one weight
    ``lam ~ Beta(alpha, alpha)`` and one pairing: ``lam * v + (1 - lam) * v[perm]`` for both,
    so the teacher's targets describe exactly the image the student sees."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * xt + (1 - lam) * xt[perm]


class StudentNet(nn.Module):
    """What distillation trains (and DDP wraps): the student, plus the projector for the
    features objective. ``forward(x)`` gives logits (task) or projected features."""

    def __init__(self, student: nn.Module, objective: str, projector: nn.Module | None):
        super().__init__()
        self.student, self.projector, self.objective = student, projector, objective
        if objective == "features":
            get_classifier = getattr(student, "get_classifier", None)
            head = get_classifier() if callable(get_classifier) else None
            if isinstance(head, nn.Module):
                head.requires_grad_(False)  # never run: no gradient, kept out of DDP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.objective == "task":
            # The plain forward keeps the student's head dropout; only logits are needed here.
            return self.student(x)
        feats = self.student.forward_head(self.student.forward_features(x), pre_logits=True)
        return self.projector(feats) if self.projector is not None else feats


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


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
            0.1 for contrastive; cosine and mse ignore it). The caller passes the
            objective's own temperature (KD's or the contrastive loss's, never one for both).
        projector: optional module mapping student features [B, Ds] to [B, Dt] (features
            objective only), e.g. ``ktray.losses.FeatureProjector``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        objective: str = "task",
        loss: str | None = None,
        temperature: float | None = None,
        projector: nn.Module | None = None,
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
        self.net = StudentNet(student, objective, projector)
        self.teacher = teacher
        self._teacher_dtype: torch.dtype | None = None
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    # -- parts ------------------------------------------------------------------------------

    @property
    def student(self) -> nn.Module:
        return _unwrap(self.net).student

    @property
    def projector(self) -> nn.Module | None:
        return _unwrap(self.net).projector

    def wrap_net(self, wrap) -> DistillModule:
        """Replace ``net`` by ``wrap(net)`` (e.g. DDP); the teacher is left as it is."""
        self.net = wrap(self.net)
        return self

    def teacher_bf16(self) -> None:
        """Keep the online teacher's weights in bf16 and run it on bf16 inputs."""
        if self.teacher is not None:
            self.teacher.to(torch.bfloat16)
            self._teacher_dtype = torch.bfloat16

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should update: student (+ projector), never the teacher
        (nor, for the features objective, the student's unused classifier)."""
        return (p for p in self.net.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> DistillModule:
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
        x_teacher: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        teacher_features: torch.Tensor | None,
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
        with torch.inference_mode():
            if self._teacher_dtype is not None:
                x_teacher = x_teacher.to(self._teacher_dtype)
            logits, features = self.teacher.forward_all(x_teacher)
            target = (logits if self.objective == "task" else features).float()
        return target.clone()  # a normal tensor: the loss may save it for backward

    def _loss(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.temperature is None:
            return self.loss_fn(student, target)
        return self.loss_fn(student, target, self.temperature)

    def forward(
        self,
        x_student: torch.Tensor,
        x_teacher: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
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
        out = self.net(x_student)
        loss = self._loss(out, target)
        if self.objective == "task":
            agree = (out.detach().argmax(-1) == target.argmax(-1)).float().mean()
            return {"loss": loss, "kd": loss.detach(), "agree": agree}
        return {"loss": loss, "feat": loss.detach()}
