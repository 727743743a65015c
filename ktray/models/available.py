"""Up-front checks that every named model can be built with its weights, before any work.

:func:`check_teacher`, :func:`check_student` and :func:`check_encoder` look at names, the local
Hugging Face / torch hub caches and weight files without downloading anything (one bounded TCP
connect to the hub host at most, when nothing is cached), and check a local checkpoint's keys
and shapes against the model built on the meta device (shapes only, no memory, no init
cost): missing or unexpected keys beyond the replaced classifier are an error here, not after
the training run has started.
"""

from __future__ import annotations

import logging
import os

import torch

from ktray import storage
from ktray.errors import KtrayError
from ktray.models.backbones import (
    _load_checkpoint,
    check_backbone,
    check_timm_name,
    create_backbone,
)
from ktray.models.checkpoint import SPEC_FILE, read_spec
from ktray.models.efficientnet_lite import lite_variant
from ktray.models.student import (
    TIMM_PREFIX,
    _load_student_checkpoint,
    checkpoint_file,
    create_student,
)


def is_model_folder(path: str) -> bool:
    """Whether ``path`` is a ktray model folder (``model.json`` + ``model.safetensors``)."""
    return bool(path) and storage.exists(storage.join(path, SPEC_FILE))


def _on_meta(build):
    """``build()`` on the meta device; None when a model cannot be built there."""
    try:
        with torch.device("meta"):
            return build()
    except KtrayError:
        raise
    except Exception:  # noqa: BLE001 - some models cannot be built shape-only: load-time check
        return None


def check_teacher(
    backbone: str, pretrained: bool, checkpoint: str = "", img_size: int | None = None
) -> None:
    """The teacher backbone (or a finished ktray teacher folder) can be had.

    Raises:
        KtrayError: Unknown name, weights not available, a missing checkpoint, a ktray folder
            that is not a teacher, or a checkpoint that does not fit the backbone.
    """
    if checkpoint and is_model_folder(checkpoint):
        spec = read_spec(checkpoint)
        if spec["kind"] != "teacher":
            raise KtrayError(f"{checkpoint} is a ktray {spec['kind']} model, not a teacher")
        return
    check_backbone(backbone, pretrained and not checkpoint)
    if checkpoint:
        if storage.is_remote(checkpoint) or not os.path.isfile(checkpoint):
            raise KtrayError(
                f"checkpoint not found: {checkpoint} (a local state-dict file or "
                "a ktray teacher folder)"
            )
        model = _on_meta(lambda: create_backbone(backbone, pretrained=False, img_size=img_size))
        if model is not None:
            _load_checkpoint(model, checkpoint)


def check_student(
    arch: str, pretrained: bool, checkpoint: str = "", img_size: int | None = None
) -> None:
    """The student arch exists, its pretrained weights can be had, a checkpoint fits it.

    Raises:
        KtrayError: As :func:`check_teacher`.
    """
    name = arch.strip()
    if lite_variant(name) is not None:  # offline ImageNet weights, as for a teacher
        check_backbone(name, pretrained and not checkpoint)
    else:
        check_timm_name(
            name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name,
            pretrained and not checkpoint,
        )
    if checkpoint:
        path = checkpoint_file(checkpoint)
        model = _on_meta(lambda: create_student(name, 2, img_size=img_size))
        if model is not None:
            quiet = logging.getLogger("ktray.models.student")
            level, quiet.level = quiet.level, logging.ERROR  # the head size is the task's
            try:
                _load_student_checkpoint(model, path)
            finally:
                quiet.level = level


def check_encoder(name: str, pretrained: bool) -> None:
    """A curation encoder (any backbone name) can be had with its weights."""
    check_backbone(name, pretrained)
