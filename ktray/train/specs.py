"""Typed specs of the three training kinds: what a Ray Train worker needs to train one model.

A spec holds every setting the run uses and nothing else, so it is both the worker's input and
the stage's reuse key: ``config_hash(spec, inputs)`` (``inputs`` = upstream hashes / URIs)
changes exactly when a finished run would train differently. Stages build a spec with
``from_config(cfg, ...)`` (``cfg`` duck-typed: this module never imports ``ktray.config`` or
ray), ship ``dataclasses.asdict(spec)`` to the workers, which rebuild it with
:func:`from_dict`.

Every field names the config keys it is read from in its metadata (``keys``), so sweep
sharing (:func:`config_keys`) is derived from the specs instead of a hand-written list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TeacherSpec",
    "DistillSpec",
    "FinetuneSpec",
    "SPECS",
    "config_keys",
    "from_dict",
    "resolve_precision",
]


def _k(*keys: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"keys": keys})


@dataclass(frozen=True, kw_only=True)
class _Run:
    """Settings every training kind shares (``train.*`` and the seed)."""

    seed: int = _k("data.seed")
    precision: str = _k("train.precision")
    """``auto``, ``bf16`` or ``fp32`` (see :func:`resolve_precision`)."""
    compile: bool = _k("train.compile")
    report_every: int = _k("train.report_every")
    checkpoint_every: int = _k("train.checkpoint_every")
    task_type: str = _k("data.kind", default="classification")
    """``classification`` or ``segmentation`` (from ``data.kind``)."""
    ignore_index: int = _k("data.ignore_index", default=255)
    """Segmentation: mask value counted nowhere."""


def _task_type(cfg) -> str:
    from ktray.data.segmentation import is_segmentation

    return "segmentation" if is_segmentation(cfg.data.kind) else "classification"


def _run_kwargs(cfg, student: bool = False) -> dict:
    """The shared settings; a student's seed (distill, finetune) adds ``train.seed`` (the
    replicate seed of ``seeds=N``), the teacher's is ``data.seed`` alone (shared)."""
    t = cfg.train
    seg = _task_type(cfg) == "segmentation"
    return {
        "task_type": _task_type(cfg),
        "ignore_index": cfg.data.ignore_index if seg else 255,
        "seed": cfg.data.seed + (t.seed if student else 0),
        "precision": t.precision,
        "compile": bool(t.compile),
        "report_every": t.report_every,
        "checkpoint_every": t.checkpoint_every,
    }


@dataclass(frozen=True, kw_only=True)
class _Student:
    """The student architecture (distill and finetune)."""

    student_arch: str = _k("student.arch")
    student_img_size: int = _k("student.img_size")
    student_pretrained: bool = _k("student.pretrained")
    student_checkpoint: str = _k("student.checkpoint")
    student_head: str = _k("student.head", default="")
    """Segmentation decoder (``fpn`` / ``deeplabv3``); empty for classification."""


def _student_kwargs(cfg) -> dict:
    s = cfg.student
    return {
        "student_head": s.head if _task_type(cfg) == "segmentation" else "",
        "student_arch": s.arch,
        "student_img_size": s.img_size,
        "student_pretrained": bool(s.pretrained),
        "student_checkpoint": s.checkpoint,
    }


@dataclass(frozen=True, kw_only=True)
class TeacherSpec(_Run):
    """Adapting the VFM: backbone + task head trained on the labeled images."""

    kind: str = "teacher"
    backbone: str = _k("teacher.backbone")
    checkpoint: str = _k("teacher.checkpoint")
    pretrained: bool = _k("teacher.pretrained")
    img_size: int = _k("teacher.img_size")
    mode: str = _k("teacher.mode")
    partial_blocks: int = _k("teacher.partial_blocks")
    probe_views: int = _k("teacher.probe_views")
    steps: int = _k("teacher.epochs", "teacher.batch_size")
    """``teacher.epochs`` passes over the labeled images, in optimizer steps."""
    warmup_steps: int = _k("teacher.epochs", "teacher.batch_size")
    """5% of the steps (at least 1)."""
    lr: float = _k("teacher.lr")
    weight_decay: float = _k("teacher.weight_decay")
    batch_size: int = _k("teacher.batch_size")
    head: str = _k("teacher.head", default="")
    """Segmentation head (``linear`` / ``light``); empty for classification."""

    @classmethod
    def from_config(cls, cfg, train_rows: int) -> TeacherSpec:
        """The teacher run of ``cfg`` over a labeled train split of ``train_rows`` images."""
        t = cfg.teacher
        steps = max(1, t.epochs * -(-int(train_rows) // t.batch_size))
        # partial_blocks / probe_views only matter in the mode that uses them
        return cls(
            **_run_kwargs(cfg),
            backbone=t.backbone,
            checkpoint=t.checkpoint,
            pretrained=bool(t.pretrained),
            img_size=t.img_size,
            mode=t.mode,
            partial_blocks=t.partial_blocks if t.mode == "partial" else 0,
            probe_views=t.probe_views if t.mode == "linear" else 0,
            steps=steps,
            warmup_steps=max(1, steps // 20),
            lr=t.lr,
            weight_decay=t.weight_decay,
            batch_size=t.batch_size,
            head=t.head if _task_type(cfg) == "segmentation" else "",
        )


@dataclass(frozen=True, kw_only=True)
class DistillSpec(_Run, _Student):
    """Pretraining the student on a transfer set against the teacher's targets."""

    kind: str = "distill"
    seed: int = _k("data.seed", "train.seed")
    """``data.seed + train.seed``: the student's init, batch order and augmentation."""
    objective: str = _k("distill.objective")
    """``task`` or ``features`` (the method's objective; ``distill.objective`` by default)."""
    teacher_mode: str = _k("distill.teacher_mode")
    augment: str = _k("distill.augment", default="stored")
    """``stored`` views, or ``consistent`` fresh views for teacher and student (online)."""
    mixup: float = _k("distill.mixup", default=0.0)
    """Beta(a, a) mixup of the views, the same for teacher and student; 0 = off."""
    scale_min: float = _k("logits.scale_min", default=0.35)
    """Smallest view area (fraction of the image) of fresh views."""
    loss: str = _k("distill.feature_loss")
    """``kl`` for the task objective, else ``distill.feature_loss``."""
    temperature: float | None = _k("distill.temperature", "distill.feature_temperature")
    """The loss's temperature: ``distill.temperature`` (task), ``distill.feature_temperature``
    (contrastive features), None (cosine / mse use none)."""
    steps: int = _k("distill.steps")
    lr: float = _k("distill.lr")
    weight_decay: float = _k("distill.weight_decay")
    warmup_steps: int = _k("distill.warmup_steps")
    batch_size: int = _k("distill.batch_size")
    shuffle_buffer: int = _k("train.shuffle_buffer")
    prefetch_batches: int = _k("train.prefetch_batches")
    decode_cpus: float = _k("train.decode_cpus")
    decode_concurrency: int = _k("train.decode_concurrency")
    decode_batch: int = _k("train.decode_batch")
    cache_decoded_mb: int = _k("train.cache_decoded_mb")
    reproducible: bool = _k("train.reproducible", default=True)
    stripes: int = _k("train.stripes", default=32)
    dense_size: int = _k("logits.dense_size", default=0)
    """Segmentation: side of the teacher's stored per-pixel predictions (0: classification)."""
    dense_feature_size: int = _k("logits.dense_feature_size", default=0)
    """Segmentation, features objective: side of the stored dense teacher features."""

    @classmethod
    def from_config(cls, cfg, objective: str | None = None) -> DistillSpec:
        d, t = cfg.distill, cfg.train
        objective = objective or d.objective
        if objective == "task":
            loss, temperature = "kl", float(d.temperature)
        else:
            loss = d.feature_loss
            temperature = float(d.feature_temperature) if loss == "contrastive" else None
        return cls(
            **_run_kwargs(cfg, student=True),
            **_student_kwargs(cfg),
            objective=objective,
            teacher_mode=d.teacher_mode,
            augment=d.augment,
            mixup=float(d.mixup),
            scale_min=float(cfg.logits.scale_min),
            loss=loss,
            temperature=temperature,
            steps=d.steps,
            lr=d.lr,
            weight_decay=d.weight_decay,
            warmup_steps=d.warmup_steps,
            batch_size=d.batch_size,
            shuffle_buffer=t.shuffle_buffer,
            prefetch_batches=t.prefetch_batches,
            decode_cpus=t.decode_cpus,
            decode_concurrency=t.decode_concurrency,
            decode_batch=t.decode_batch,
            stripes=t.stripes,
            cache_decoded_mb=t.cache_decoded_mb,
            reproducible=t.reproducible,
            dense_size=cfg.logits.dense_size if _task_type(cfg) == "segmentation" else 0,
            dense_feature_size=(
                cfg.logits.dense_feature_size if _task_type(cfg) == "segmentation" else 0
            ),
        )

    @property
    def online(self) -> bool:
        return self.teacher_mode == "online"

    @property
    def target_column(self) -> str | None:
        """The stored target the worker reads (None online): logits or features."""
        if self.online:
            return None
        return "logits" if self.objective == "task" else "features"


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec(_Run, _Student):
    """Training the student (distilled or from scratch) on the labeled images."""

    kind: str = "finetune"
    seed: int = _k("data.seed", "train.seed")
    """``data.seed + train.seed``: the student's init (scratch), batch order and augmentation."""
    scratch: bool = False
    """True for a student from random init (``scratch``): ``finetune.scratch_lr`` and, when
    set, ``finetune.scratch_steps``; every other start uses ``finetune.lr`` / ``steps``."""
    steps: int = _k("finetune.steps", "finetune.scratch_steps")
    lr: float = _k("finetune.lr", "finetune.scratch_lr")
    weight_decay: float = _k("finetune.weight_decay")
    warmup_steps: int = _k("finetune.warmup_steps")
    batch_size: int = _k("finetune.batch_size")
    select: str = _k("finetune.select", default="best_val")
    """With a validation split: keep the ``best_val`` weights or the ``last`` ones."""
    val_every: int = _k("finetune.val_every", default=25)
    """With a validation split: evaluate every this many steps (0 = at reports only), plus
    step 0 and the last step."""
    patience: int = _k("finetune.patience", default=0)
    """``best_val``: stop after this many evaluations without improvement (0 = never)."""

    @classmethod
    def from_config(cls, cfg, scratch: bool) -> FinetuneSpec:
        f = cfg.finetune
        return cls(
            **_run_kwargs(cfg, student=True),
            **_student_kwargs(cfg),
            scratch=bool(scratch),
            steps=(f.scratch_steps or f.steps) if scratch else f.steps,
            lr=f.scratch_lr if scratch else f.lr,
            weight_decay=f.weight_decay,
            warmup_steps=f.warmup_steps,
            batch_size=f.batch_size,
            select=f.select,
            val_every=f.val_every,
            patience=f.patience,
        )


SPECS = {"teacher": TeacherSpec, "distill": DistillSpec, "finetune": FinetuneSpec}


def from_dict(d: dict):
    """Rebuild a spec from ``dataclasses.asdict(spec)`` (its ``kind`` names the class)."""
    cls = SPECS[d["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def config_keys(cls) -> set[str]:
    """Every config key the spec class is built from (dotted, e.g. ``distill.lr``)."""
    return {k for f in dataclasses.fields(cls) for k in f.metadata.get("keys", ())}


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; ``bf16`` / ``fp32`` as given."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision
