"""Test metrics of a saved model on an image table (no ray here)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ktray import storage
from ktray.data.datasets import LabeledImages, collate_skip_none
from ktray.errors import KtrayError
from ktray.metrics import evaluate_classifier
from ktray.models import load_model


def evaluate_model_dir(model_dir: str, table_uri: str, batch_size: int = 256,
                       num_classes: int | None = None, device: str | None = None) -> dict:
    """Accuracy (and per-class accuracy, confusion) of the model in ``model_dir``."""
    model, spec = load_model(model_dir)
    if num_classes is not None and spec["num_classes"] != num_classes:
        raise KtrayError(f"model {model_dir} predicts {spec['num_classes']} classes but the "
                         f"task has {num_classes}")
    table = storage.read_parquet(table_uri)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = LabeledImages(table, spec["img_size"], spec["mean"], spec["std"], train=False)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_skip_none)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    result = evaluate_classifier(model, loader, dev)
    result["model"] = model_dir
    return result
