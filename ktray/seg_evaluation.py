"""Test metrics and predicted masks of a saved segmentation model (no ray, no Config)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ktray import storage
from ktray.data.segmentation import SegImages, collate_seg
from ktray.errors import KtrayError
from ktray.models import load_model
from ktray.seg_metrics import evaluate_segmenter, upsample_logits


def evaluate_seg_model_dir(
    model_dir: str, table_uri: str, batch_size: int, num_classes: int, ignore_index: int = 255
) -> dict:
    """``{"test_miou", "test_pixel_accuracy", "per_class_iou", ...}`` of a ``seg_*`` checkpoint
    on a segmentation table (predictions upsampled to each mask's own size)."""
    model, spec = load_model(model_dir)
    if spec["num_classes"] != num_classes:
        raise KtrayError(
            f"model {model_dir} predicts {spec['num_classes']} classes but the task has "
            f"{num_classes}"
        )
    table = storage.read_parquet(table_uri)
    ds = SegImages(table, spec["img_size"], spec["mean"], spec["std"], train=False)
    loader = DataLoader(ds, batch_size=min(batch_size, 64), collate_fn=collate_seg)
    r = evaluate_segmenter(model, loader, "cpu", num_classes, ignore_index)
    return {
        "test_miou": r["miou"],
        "test_pixel_accuracy": r["pixel_accuracy"],
        "per_class_iou": r["per_class_iou"],
        "test_images": r["images"],
        "test_pixels": r["pixels"],
        "model": model_dir,
    }


@torch.no_grad()
def predict_masks(model_dir: str, table, rows: list[int]) -> list[np.ndarray]:
    """Predicted masks (``uint8 [H, W]`` at each mask's size) of ``rows`` of a table."""
    model, spec = load_model(model_dir)
    ds = SegImages(table.take(rows), spec["img_size"], spec["mean"], spec["std"], train=False)
    out = []
    for i in range(len(ds)):
        x, m = ds[i]
        logits = upsample_logits(model(x[None]), m.shape[-2:])
        out.append(logits.argmax(1)[0].numpy().astype(np.uint8))
    return out
