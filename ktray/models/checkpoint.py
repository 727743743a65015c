"""Model checkpoints: ``model.safetensors`` (weights) + ``model.json`` (how to rebuild).

A checkpoint folder (local or ``s3://``) holds:

- ``model.safetensors``: the full state dict (teacher: ``backbone.model.*`` and ``head.*``);
- ``model.json``: the spec, ``{"kind": "teacher"|"student", "arch", "num_classes",
  "img_size", "mean", "std", "feature_dim", "build_img_size", ...}``; a teacher also has
  ``"backbone"`` (the :func:`~ktray.models.backbones.create_backbone` name).

Both are written atomically (temporary name, then rename / move), the spec last, so a folder
with a ``model.json`` always has complete weights beside it.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ktray import storage
from ktray.errors import KtrayError
from ktray.models.backbones import create_backbone
from ktray.models.heads import TaskModel
from ktray.models.student import _unwrap, create_student, student_feature_dim
from ktray.models.weights import load_state_dict_into

MODEL_FILE = "model.safetensors"
SPEC_FILE = "model.json"
SPEC_VERSION = 1
REQUIRED_KEYS = ("kind", "arch", "num_classes", "img_size", "mean", "std")
KINDS = ("teacher", "student", "seg_teacher", "seg_student")  # seg_*: ktray.models.dense


def model_spec(model: nn.Module) -> dict:
    """The spec that rebuilds ``model``: a :class:`TaskModel` or a :func:`create_student` model.

    Args:
        model: The model (DDP / compile wrappers are looked through).

    Returns:
        A JSON-serialisable dict with at least :data:`REQUIRED_KEYS`.
    """
    model = _unwrap(model)
    if isinstance(model, TaskModel):
        backbone = model.backbone
        return {
            "kind": "teacher",
            "arch": backbone.name,
            "backbone": backbone.name,
            "num_classes": model.num_classes,
            "img_size": backbone.default_img_size,
            "build_img_size": backbone.build_img_size,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
            "feature_dim": backbone.feature_dim,
            "trainable": model.mode,
            "spec_version": SPEC_VERSION,
        }
    if not hasattr(model, "arch_name"):
        raise KtrayError("save_model needs a TaskModel or a model from create_student")
    return {
        "kind": "student",
        "arch": model.arch_name,
        "num_classes": int(model.num_classes),
        "img_size": int(model.default_img_size),
        "build_img_size": getattr(model, "build_img_size", None),
        "mean": list(model.mean),
        "std": list(model.std),
        "feature_dim": student_feature_dim(model),
        "spec_version": SPEC_VERSION,
    }


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous state dict in which no two tensors share storage.

    safetensors refuses shared storage (tied weights, views); such tensors are cloned so every
    key is stored and the file loads with a plain strict ``load_state_dict``.
    """
    state, storages = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        if value.numel() and ptr in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        state[key] = value
    return state


def save_model(model: nn.Module, path: str, spec: dict | None = None) -> str:
    """Write ``model.safetensors`` and ``model.json`` under ``path`` (folder or URI).

    Args:
        model: A :class:`TaskModel` or :func:`create_student` model (any other module needs a
            ``spec`` with every required key).
        path: Local folder or ``s3://`` prefix; created when missing.
        spec: Extra or overriding spec entries (e.g. ``{"img_size": 96}``, training metadata);
            merged over :func:`model_spec`.

    Returns:
        ``path``.

    Raises:
        KtrayError: The merged spec lacks a required key or has an unknown kind.
    """
    from safetensors.torch import save_file

    try:
        full = model_spec(model)
    except KtrayError:  # another kind of module: the caller's spec must say everything
        full = {"spec_version": SPEC_VERSION}
    full.update(spec or {})
    _validate(full, path)
    state = _state_for_saving(_unwrap(model))
    storage.makedirs(path)
    with storage.atomic_local_path(storage.join(path, MODEL_FILE)) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "kind": str(full["kind"])})
    storage.write_json(storage.join(path, SPEC_FILE), full)
    return path


def _validate(spec: dict, where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise KtrayError(f"model spec for {where} lacks {', '.join(missing)}")
    if spec["kind"] not in KINDS:
        raise KtrayError(
            f"model spec for {where} has kind {spec['kind']!r}; expected one of {', '.join(KINDS)}"
        )
    if spec["kind"] in ("teacher", "seg_teacher") and not spec.get("backbone"):
        raise KtrayError(f"teacher spec for {where} lacks backbone")


def read_spec(path: str) -> dict:
    """The spec (``model.json``) of a checkpoint folder.

    Raises:
        KtrayError: No checkpoint there, or an invalid spec.
    """
    uri = storage.join(path, SPEC_FILE)
    if not storage.exists(uri):
        raise KtrayError(f"no model checkpoint at {path} ({SPEC_FILE} missing)")
    try:
        spec = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as e:
        raise KtrayError(f"invalid {uri}: {e}") from None
    _validate(spec, path)
    return spec


def build_from_spec(spec: dict) -> nn.Module:
    """An untrained model with the architecture ``spec`` describes (no weights downloaded)."""
    size = spec.get("build_img_size")
    if spec["kind"].startswith("seg_"):
        from ktray.models import dense

        return dense.build_from_spec(spec)
    if spec["kind"] == "teacher":
        backbone = create_backbone(spec["backbone"], pretrained=False, img_size=size)
        # The spec's preprocessing wins: it is what the saved weights were trained with.
        backbone.default_img_size = int(spec["img_size"])
        backbone.mean, backbone.std = tuple(spec["mean"]), tuple(spec["std"])
        return TaskModel(backbone, int(spec["num_classes"]))
    model = create_student(spec["arch"], int(spec["num_classes"]), pretrained=False, img_size=size)
    model.default_img_size = int(spec["img_size"])
    model.mean, model.std = tuple(spec["mean"]), tuple(spec["std"])
    return model


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint folder and load its weights.

    Args:
        path: Local folder or ``s3://`` prefix written by :func:`save_model`.
        device: Where to put the model.

    Returns:
        ``(model, spec)``; the model is in eval mode. A teacher is a :class:`TaskModel` in
        ``full`` trainable mode (call ``set_trainable`` to freeze it again).

    Raises:
        KtrayError: Missing files, an invalid spec, or weights that do not fit the spec.
    """
    from safetensors.torch import load as load_bytes
    from safetensors.torch import load_file

    spec = read_spec(path)
    weights = storage.join(path, MODEL_FILE)
    if not storage.exists(weights):
        raise KtrayError(f"no model weights at {weights}")
    if storage.is_remote(weights):
        state = load_bytes(storage.read_bytes(weights))
    else:  # mapped from the file: no copy of its bytes in memory besides the tensors
        state = load_file(storage.fs_and_path(weights)[1])
    model = _uninitialised(spec)
    if model is not None:
        load_state_dict_into(model, state, f"checkpoint {path}", assign=True)
        if _has_meta_tensors(model):
            model = None  # a tensor the checkpoint does not hold (non-persistent): build it
    if model is None:
        model = build_from_spec(spec)
        load_state_dict_into(model, state, f"checkpoint {path}")
    return model.to(device).eval(), spec


def _uninitialised(spec: dict) -> nn.Module | None:
    """The model ``spec`` describes, built on the meta device: shapes without the random
    initialisation its weights would replace (ViT-L/16: 2.4 s of one core, and a second copy
    of the weights in memory while loading); None where the architecture cannot be built
    there."""
    try:
        with torch.device("meta"):
            return build_from_spec(spec)
    except Exception:  # noqa: BLE001 - e.g. a constructor reading a tensor's value
        return None


def _has_meta_tensors(model: nn.Module) -> bool:
    """Whether a parameter, buffer or plain tensor attribute of ``model`` is on the meta
    device (computed in a constructor and not saved: only a real build makes it)."""
    for module in model.modules():
        own = [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in (*module._parameters.values(), *module._buffers.values(), *own):
            if t is not None and t.is_meta:
                return True
    return False
