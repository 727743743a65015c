"""Forward FLOPs of a model, for the compute accounting in stage manifests.

Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one zero image: matmuls and
convolutions (2 FLOPs per multiply-add; grouped and depthwise convolutions counted by their
real cost), attention through ``scaled_dot_product_attention``. Elementwise operations, norms
and pooling are not counted; they are a few percent of a CNN's or ViT's total.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ktray.errors import KtrayError


def count_flops(model: nn.Module, img_size: int, channels: int = 3) -> float:
    """Forward FLOPs for one ``[1, channels, img_size, img_size]`` image.

    Args:
        model: Any image model (teacher, backbone or student); its train/eval mode is restored.
        img_size: Input side in pixels.
        channels: Input channels.

    Returns:
        FLOPs of one forward pass (a training step costs about 3x this per image).

    Raises:
        KtrayError: ``img_size`` is not positive.
    """
    if int(img_size) < 1:
        raise KtrayError(f"img_size must be positive, got {img_size}")
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    x = torch.zeros(1, channels, int(img_size), int(img_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())
