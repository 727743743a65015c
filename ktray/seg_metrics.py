"""Segmentation metrics (mIoU, pixel accuracy, per-class IoU) and the evaluation loop.

Pixels whose label is the ignore index count nowhere. A class with no pixel in the ground
truth and none predicted has no IoU (NaN in ``per_class_iou``) and is left out of the mean;
a class present in the ground truth or the predictions counts, even at IoU 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ktray.errors import KtrayError

__all__ = ["seg_confusion", "seg_scores", "upsample_logits", "evaluate_segmenter"]


def seg_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``[C, C]`` int64 pixel counts (row = ground truth, column = prediction) of integer
    maps of equal shape; ``ignore_index`` pixels are left out.

    Raises:
        KtrayError: Shapes differ, or a ground-truth id outside ``0..C-1`` that is not
            ``ignore_index``.
    """
    if pred.shape != target.shape:
        raise KtrayError(f"prediction {tuple(pred.shape)} and mask {tuple(target.shape)} differ")
    target = target.to(pred.device).long().reshape(-1)
    pred = pred.long().reshape(-1)
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise KtrayError(
            f"mask class ids must lie in [0, {num_classes}) or be {ignore_index}, got "
            f"{int(target.max())}"
        )
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def seg_scores(confusion: np.ndarray | torch.Tensor) -> dict:
    """``{"miou", "pixel_accuracy", "per_class_iou"}`` of a ``[C, C]`` confusion matrix."""
    c = np.asarray(confusion, np.float64)
    tp = np.diag(c)
    union = c.sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = c.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C, H, W]`` (bilinear; identity when already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_segmenter(
    model: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device,
    num_classes: int,
    ignore_index: int = 255,
) -> dict:
    """Test metrics of a dense model (``model(x) -> [B, C, h, w]``) over ``(x, masks)``
    batches; predictions are upsampled to each mask's own size before the argmax.

    Returns:
        :func:`seg_scores` plus ``pixels`` (counted pixels) and ``images``.
    """
    model = model.to(device).eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    images = 0
    for x, masks in loader:
        logits = model(x.to(device))
        if isinstance(masks, torch.Tensor):
            pred = upsample_logits(logits, masks.shape[-2:]).argmax(1)
            conf += seg_confusion(pred, masks.to(device), num_classes, ignore_index)
        else:
            for i, m in enumerate(masks):
                pred = upsample_logits(logits[i : i + 1], m.shape[-2:]).argmax(1)[0]
                conf += seg_confusion(pred, m.to(device), num_classes, ignore_index)
        images += len(x)
    out = seg_scores(conf.cpu().numpy())
    out.update(pixels=int(conf.sum()), images=images, confusion=conf.cpu().tolist())
    return out
