"""The adapted teacher: a backbone plus a linear task head, with three adaptation modes.

``linear``: only the head trains; the backbone is frozen and stays in eval mode even inside
``model.train()`` (BatchNorm statistics and dropout of a frozen network must not change).
``partial``: the last N parameter groups of the backbone train with the head; frozen parts stay
in eval mode. ``full``: everything trains.
"""

from __future__ import annotations

import torch
from torch import nn

from ktray.errors import KtrayError
from ktray.models.backbones import Backbone

TRAINABLE_MODES = ("linear", "partial", "full")


def _param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in groups ordered from input to output.

    timm models: one group per block (``group_matcher(coarse=False)``, the grouping timm uses
    for layer-wise learning-rate decay). Otherwise: one group per module that owns parameters,
    in module order.
    """
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        named = dict(model.named_parameters())
        groups = group_parameters(model, matcher(coarse=False))
        return [[named[n] for n in names if n in named] for _, names in sorted(groups.items())]
    groups = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            groups.append(own)
    return groups


def unfreeze_last_groups(model: nn.Module, n: int) -> int:
    """Freeze ``model`` except its last ``n`` parameter groups.

    open_clip towers use their own ``lock(unlocked_groups=n)``; other models the groups of
    :func:`_param_groups`.

    Args:
        model: The backbone network.
        n: Trailing groups left trainable (``n >= 1``).

    Returns:
        The number of parameters left trainable.
    """
    lock = getattr(model, "lock", None)
    if callable(lock) and not hasattr(model, "group_matcher"):
        lock(unlocked_groups=n)  # open_clip: freezes everything, then unlocks the last n groups
    else:
        model.requires_grad_(False)
        for group in _param_groups(model)[-n:]:
            for p in group:
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _eval_frozen(module: nn.Module) -> None:
    """Put every maximal submodule whose parameters are all frozen into eval mode."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _eval_frozen(child)


class TaskModel(nn.Module):
    """Backbone + ``nn.Linear(feature_dim, num_classes)``.

    Attributes:
        backbone: The :class:`~ktray.models.backbones.Backbone`.
        head: The linear classifier.
        num_classes: C.
        mode: The current adaptation mode (``linear``, ``partial`` or ``full``).
    """

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        if int(num_classes) < 1:
            raise KtrayError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.head = nn.Linear(backbone.feature_dim, self.num_classes)
        self.mode = "full"
        self.partial_blocks = 0

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @property
    def default_img_size(self) -> int:
        return self.backbone.default_img_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.backbone.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features.

        Args:
            x: Normalised images ``[B, 3, H, W]``.

        Returns:
            Features ``[B, D]``.
        """
        return self.backbone(x)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the features they come from, in one pass.

        Args:
            x: Normalised images ``[B, 3, H, W]``.

        Returns:
            ``(logits [B, C], features [B, D])``.
        """
        features = self.backbone(x)
        return self.head(features), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Task logits.

        Args:
            x: Normalised images ``[B, 3, H, W]``.

        Returns:
            Logits ``[B, C]``.
        """
        return self.head(self.backbone(x))

    def set_trainable(self, mode: str, partial_blocks: int = 2) -> TaskModel:
        """Choose what trains.

        Args:
            mode: ``linear`` (head only), ``partial`` (last ``partial_blocks`` backbone
                parameter groups + head) or ``full``.
            partial_blocks: Trailing backbone groups to train in ``partial`` mode; for timm
                models a group is one block (the last group also holds the final norm / head
                conv), for open_clip towers one of their ``lock`` groups.

        Returns:
            ``self``, with ``requires_grad`` set and train/eval modes re-applied.

        Raises:
            KtrayError: Unknown mode or ``partial_blocks < 1`` in partial mode.
        """
        if mode not in TRAINABLE_MODES:
            choices = ", ".join(TRAINABLE_MODES)
            raise KtrayError(f"unknown trainable mode {mode!r}; choose one of {choices}")
        self.head.requires_grad_(True)
        if mode == "full":
            self.backbone.requires_grad_(True)
        elif mode == "linear":
            self.backbone.requires_grad_(False)
        else:
            if int(partial_blocks) < 1:
                raise KtrayError(f"partial mode needs partial_blocks >= 1, got {partial_blocks}")
            unfreeze_last_groups(self.backbone.model, int(partial_blocks))
        self.mode = mode
        self.partial_blocks = int(partial_blocks) if mode == "partial" else 0
        return self.train(self.training)

    def train(self, mode: bool = True) -> TaskModel:
        """Set train mode, keeping frozen parts of the backbone in eval mode."""
        super().train(mode)
        if not mode or self.mode == "full":
            return self
        if self.mode == "linear":
            self.backbone.eval()
            return self
        _eval_frozen(self.backbone)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that currently require gradients (for the optimizer)."""
        return [p for p in self.parameters() if p.requires_grad]
