"""Dense (per-pixel) models for semantic segmentation: the VFM teacher with a segmentation
head, and timm students with a light decoder (no ray, no Config here).

- :class:`DenseTeacher`: the backbone's feature maps (timm ``forward_intermediates``: a ViT's
  patch tokens as a grid, a CNN's stride-8/16/32 maps resized to the finest and
  concatenated) and a head: ``linear`` (BatchNorm + per-patch 1x1 conv, DINOv2's linear
  segmentation protocol) or ``light`` (3x3 conv + BN + ReLU + 1x1 conv). ``forward(x)`` gives
  logits on the feature grid; callers upsample them to the mask.
- :class:`DenseStudent`: any timm model with ``features_only`` and a light decoder,
  ``fpn`` (top-down lateral sum) or ``deeplabv3`` (a small ASPP on the last level, fused
  with the stride-8 level as in DeepLabV3+); logits at stride 8.

Both have ``forward_all(x) -> (logits [B, C, h, w], features [B, D, h', w'])``.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ktray.errors import KtrayError
from ktray.models.backbones import Backbone, check_timm_name, create_backbone
from ktray.models.heads import TRAINABLE_MODES, _eval_frozen, unfreeze_last_groups

TEACHER_HEADS = ("linear", "light")
STUDENT_HEADS = ("fpn", "deeplabv3")
KINDS = ("seg_teacher", "seg_student")
DECODER_DIM = 64


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DenseBackbone(nn.Module):
    """A teacher backbone's dense features: ``[B, D, h, w]``."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        model = backbone.model
        if not callable(getattr(model, "forward_intermediates", None)):
            raise KtrayError(
                f"backbone {backbone.name} has no dense features (a timm model with "
                "forward_intermediates is needed for segmentation)"
            )
        self.backbone = backbone
        info = getattr(model, "feature_info", None) or []
        reductions = [int(f["reduction"]) for f in info]
        if reductions and len(set(reductions)) > 1:  # CNN: the stride-8/16/32 levels
            picks = [i for i, r in enumerate(reductions) if r in (8, 16, 32)]
            self.indices = picks or list(range(len(info)))[-3:]
        else:  # ViT-like: the last block's patch tokens
            self.indices = [len(info) - 1] if info else [-1]
        self.feature_dim = (
            sum(int(info[i]["num_chs"]) for i in self.indices) if info else int(model.num_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.model.forward_intermediates(
            x, indices=self.indices, intermediates_only=True
        )
        size = maps[0].shape[-2:]
        return torch.cat([_resize(m, size) for m in maps], 1)


def _head(kind: str, dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, num_classes, 1))
    if kind == "light":
        return nn.Sequential(
            nn.Conv2d(dim, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, num_classes, 1),
        )
    raise KtrayError(f"unknown teacher.head {kind!r}; choose one of {', '.join(TEACHER_HEADS)}")


class DenseTeacher(nn.Module):
    """VFM backbone (dense features) + segmentation head, with the adaptation modes of
    :class:`~ktray.models.heads.TaskModel` (``linear`` keeps the backbone frozen in eval)."""

    def __init__(self, backbone: Backbone, num_classes: int, head: str = "linear"):
        super().__init__()
        self.dense = DenseBackbone(backbone)
        self.num_classes, self.head_kind = int(num_classes), head
        self.head = _head(head, self.dense.feature_dim, self.num_classes)
        self.mode = "full"

    @property
    def backbone(self) -> Backbone:
        return self.dense.backbone

    @property
    def feature_dim(self) -> int:
        return self.dense.feature_dim

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.dense(x)
        return self.head(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dense(x))

    def set_trainable(self, mode: str, partial_blocks: int = 2) -> DenseTeacher:
        if mode not in TRAINABLE_MODES:
            raise KtrayError(f"unknown trainable mode {mode!r}")
        self.head.requires_grad_(True)
        model = self.backbone.model
        if mode == "full":
            model.requires_grad_(True)
        elif mode == "linear":
            model.requires_grad_(False)
        else:
            unfreeze_last_groups(model, int(partial_blocks))
        self.mode = mode
        return self.train(self.training)

    def train(self, mode: bool = True) -> DenseTeacher:
        super().train(mode)
        if mode and self.mode == "linear":
            self.dense.eval()
        elif mode and self.mode == "partial":
            _eval_frozen(self.dense)  # frozen blocks keep their BatchNorm statistics
        return self


class _FPN(nn.Module):
    def __init__(self, channels: list[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.smooth = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True)
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            y = lat(f) + _resize(y, f.shape[-2:])
        return self.smooth(y)


def _cbr(cin: int, cout: int, k: int = 1, d: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
    )


class _DeepLab(nn.Module):
    """A small ASPP (1x1, 3x3 at dilation 2 and 4, image pooling) on the last level, fused
    with the finest level (DeepLabV3+-style)."""

    def __init__(self, channels: list[int], dim: int):
        super().__init__()
        c = channels[-1]
        self.branches = nn.ModuleList([_cbr(c, dim), _cbr(c, dim, 3, 2), _cbr(c, dim, 3, 4)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, dim, 1), nn.ReLU(True))
        self.project = _cbr(4 * dim, dim)
        self.low = _cbr(channels[0], dim // 2)
        # not ``fuse``: timm's reparameterize_model (ONNX export) calls any ``fuse`` attribute
        self.merge = _cbr(dim + dim // 2, dim, 3)
        self._register_load_state_dict_pre_hook(_renamed_fuse)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = self.pool(top).expand(-1, -1, *top.shape[-2:])
        y = self.project(torch.cat([b(top) for b in self.branches] + [pooled], 1))
        low = self.low(feats[0])
        return self.merge(torch.cat([_resize(y, low.shape[-2:]), low], 1))


def _renamed_fuse(state, prefix, *_):
    """Checkpoints written before the rename (``fuse.*`` -> ``merge.*``) still load."""
    for key in [k for k in state if k.startswith(prefix + "fuse.")]:
        state[prefix + "merge." + key[len(prefix + "fuse.") :]] = state.pop(key)


class DenseStudent(nn.Module):
    """timm ``features_only`` encoder (its stride-8/16/32 levels) + light decoder + 1x1
    classifier; ``forward(x) -> logits [B, C, H/8, W/8]``."""

    def __init__(self, arch: str, num_classes: int, head: str = "fpn", pretrained: bool = False):
        super().__init__()
        name = arch[len("timm:") :] if arch.startswith("timm:") else arch
        check_timm_name(name, pretrained)
        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except (RuntimeError, ValueError, TypeError) as e:
            raise KtrayError(f"student {arch} has no features_only mode: {e}") from None
        reductions = probe.feature_info.reduction()
        picks = [i for i, r in enumerate(reductions) if r in (8, 16, 32)] or list(
            range(len(reductions))
        )[-3:]
        del probe
        self.encoder = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=picks
        )
        channels = self.encoder.feature_info.channels()
        if head == "fpn":
            self.decoder = _FPN(channels, DECODER_DIM)
        elif head == "deeplabv3":
            self.decoder = _DeepLab(channels, DECODER_DIM)
        else:
            raise KtrayError(
                f"unknown student.head {head!r}; choose one of {', '.join(STUDENT_HEADS)}"
            )
        self.classifier = nn.Conv2d(DECODER_DIM, int(num_classes), 1)
        self.arch, self.head_kind, self.num_classes = arch, head, int(num_classes)
        cfg = self.encoder.pretrained_cfg or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.feature_dim = DECODER_DIM

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.decoder(self.encoder(x))
        return self.classifier(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


def build_dense_teacher(
    backbone: str,
    num_classes: int,
    head: str = "linear",
    pretrained: bool = True,
    checkpoint: str | None = None,
    img_size: int | None = None,
) -> DenseTeacher:
    return DenseTeacher(
        create_backbone(backbone, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size),
        num_classes,
        head,
    )


def build_from_spec(spec: dict) -> nn.Module:
    """An untrained dense model with the architecture a ``seg_*`` checkpoint spec describes."""
    if spec["kind"] == "seg_teacher":
        model = build_dense_teacher(
            spec["backbone"],
            int(spec["num_classes"]),
            spec.get("head", "linear"),
            pretrained=False,
            img_size=spec.get("build_img_size"),
        )
        model.backbone.mean, model.backbone.std = tuple(spec["mean"]), tuple(spec["std"])
        return model
    return DenseStudent(spec["arch"], int(spec["num_classes"]), spec.get("head", "fpn"))


def dense_targets(
    model: nn.Module, x: torch.Tensor, dense_size: int, feature_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense model's logits resized to ``dense_size`` (bilinear) and, when
    ``feature_size`` > 0, its features average-pooled to ``feature_size``."""
    logits, feats = model.forward_all(x)
    logits = _resize(logits.float(), (dense_size, dense_size))
    if not feature_size:
        return logits, None
    return logits, F.adaptive_avg_pool2d(feats.float(), feature_size)
