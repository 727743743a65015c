"""Cheap checks of a config before any Ray work starts (each failure is one line)."""

from __future__ import annotations

import difflib

from ktray import storage
from ktray.config import Config
from ktray.errors import KtrayError

OBJECTIVES = ("task", "features")
TRANSFERS = ("in_domain", "generic", "curated")


def check_timm_name(name: str, what: str) -> None:
    import timm

    if name.startswith("hf-hub:") or name.startswith("hf_hub:") or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise KtrayError(f"unknown {what} model '{name}'{hint}")


def check_backbone_name(name: str) -> None:
    if name.startswith("open_clip:"):
        import open_clip

        arch = name.split(":")[1]
        if arch not in open_clip.list_models():
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
            raise KtrayError(f"unknown open_clip model '{arch}'"
                             + (f" (close: {', '.join(close)})" if close else ""))
        return
    if name.startswith("efficientnet_lite"):
        return
    check_timm_name(name, "teacher backbone")


def parse_method(method: str) -> tuple[str, str]:
    """``"task@generic"`` -> ("task", "generic"); ``"scratch"``/``"teacher"`` -> (name, "")."""
    if method in ("scratch", "teacher"):
        return method, ""
    if "@" not in method:
        raise KtrayError(f"unknown method '{method}': use teacher, scratch or "
                         "OBJECTIVE@TRANSFER (e.g. task@in_domain)")
    objective, transfer = method.split("@", 1)
    if objective not in OBJECTIVES:
        raise KtrayError(f"unknown objective '{objective}' in method '{method}'; valid: "
                         f"{', '.join(OBJECTIVES)}")
    return objective, transfer


def check_config(cfg: Config) -> None:
    """Raise KtrayError on the first problem found in ``cfg``."""
    if cfg.data.kind in ("imagefolder", "parquet", "fashion_mnist") and not storage.exists(cfg.data.root):
        raise KtrayError(f"data.root not found: {cfg.data.root}")
    check_backbone_name(cfg.teacher.backbone)
    check_timm_name(cfg.student.arch, "student")
    if cfg.teacher.mode not in ("linear", "partial", "full"):
        raise KtrayError(f"teacher.mode must be linear, partial or full, not '{cfg.teacher.mode}'")
    if cfg.distill.teacher_mode not in ("precomputed", "online"):
        raise KtrayError("distill.teacher_mode must be precomputed or online")
    if cfg.distill.feature_loss not in ("cosine", "mse", "contrastive"):
        raise KtrayError(f"distill.feature_loss must be cosine, mse or contrastive, "
                         f"not '{cfg.distill.feature_loss}'")
    for path, what in ((cfg.teacher.checkpoint, "teacher.checkpoint"),
                       (cfg.student.checkpoint, "student.checkpoint")):
        if path and not storage.exists(path):
            raise KtrayError(f"{what} not found: {path}")
    for m in cfg.methods:
        parse_method(m)
    if cfg.logits.views < 1:
        raise KtrayError("logits.views must be at least 1")
