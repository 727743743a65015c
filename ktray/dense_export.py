"""Deployable dense students: what :mod:`ktray.export` exports for a ``seg_*`` checkpoint, and
the test mIoU of PyTorch and each ONNX file side by side (no ray, no Config).

A dense model's own output is on its feature grid (a student's logits at stride 8, the
teacher's on its patch grid). The exported graph is :class:`FullResolution`: those logits
upsampled (bilinear, ``align_corners=False``, as the evaluation does) to the input size, so
``model.onnx`` maps ``input [N, 3, S, S]`` to ``logits [N, C, S, S]``; ``argmax`` over axis 1
is the mask at S x S (resize it to the image's own size, nearest). S is fixed
(``img_size`` of ``model.json``), the batch axis is dynamic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ktray.errors import KtrayError

DENSE_KINDS = ("seg_teacher", "seg_student")


def is_dense(spec: dict) -> bool:
    """Whether a checkpoint spec is a segmentation model."""
    return spec.get("kind") in DENSE_KINDS


class FullResolution(nn.Module):
    """``x [N, 3, S, S] -> logits [N, C, S, S]``: a dense model's logits upsampled to its
    input's size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def exportable(model: nn.Module, spec: dict) -> nn.Module:
    """The module :func:`ktray.export.export_model` exports and measures for ``spec``: the
    model itself (classification), or :class:`FullResolution` around it (segmentation)."""
    return FullResolution(model).eval() if is_dense(spec) else model


def miou_by_backend(
    model: nn.Module, files: dict, table, spec: dict, ignore_index: int = 255
) -> dict:
    """Test mIoU of PyTorch (``model``, a :class:`FullResolution`) and of each ONNX file of
    ``files`` over the same images of a segmentation table (predictions resized to each
    mask's size, bilinear on the logits, then argmax).

    Returns:
        ``{"pytorch": mIoU, NAME: mIoU for NAME in files, "images": N}``.

    Raises:
        KtrayError: The table has no mask column, or its masks hold unknown class ids.
    """
    from ktray import export
    from ktray.data.segmentation import MASK, SegImages
    from ktray.seg_metrics import seg_confusion, seg_scores, upsample_logits

    if MASK not in table.column_names:
        raise KtrayError("test mIoU needs a segmentation test table (with a mask column)")
    c = int(spec["num_classes"])
    runners = {"pytorch": lambda x: export.torch_logits(model, x)}
    for name, path in files.items():
        runners[name] = lambda x, s=export.onnx_session(path): export.onnx_logits(s, x)
    conf = {name: torch.zeros(c, c, dtype=torch.int64) for name in runners}
    ds = SegImages(table, spec["img_size"], spec["mean"], spec["std"], train=False)
    for start in range(0, len(ds), 64):
        items = [ds[i] for i in range(start, min(start + 64, len(ds)))]
        x = np.stack([xi.numpy() for xi, _ in items]).astype(np.float32)
        for name, fn in runners.items():
            logits = torch.from_numpy(fn(x))
            for i, (_, mask) in enumerate(items):
                pred = upsample_logits(logits[i : i + 1], mask.shape[-2:]).argmax(1)[0]
                conf[name] += seg_confusion(pred, mask, c, ignore_index)
    return {name: seg_scores(m.numpy())["miou"] for name, m in conf.items()} | {"images": len(ds)}
