"""Test metrics of a saved model on an image table (no ray here).

:func:`evaluate_model_dir` evaluates in this process (small test sets). For large ones the
``evaluate`` stage runs Ray Data batch inference: :func:`ktray.data.decode.decode_labeled`
(a CPU stage, torch-free), :class:`ConfusionCounter` (model actors: confusion counts and
loss sums per batch) and :func:`metrics_from_counts` (their sum -> the same metrics as the
local path).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ktray import storage
from ktray.data.datasets import LabeledImages, collate_skip_none
from ktray.data.decode import decode_labeled  # noqa: F401  (torch-free; re-exported)
from ktray.errors import KtrayError
from ktray.metrics import confusion_matrix, evaluate_classifier
from ktray.models import load_model


def evaluate_model_dir(
    model_dir: str,
    table_uri: str,
    batch_size: int = 256,
    num_classes: int | None = None,
    device: str | None = None,
) -> dict:
    """Accuracy (and per-class accuracy, confusion) of the model in ``model_dir``."""
    model, spec = load_model(model_dir)
    if num_classes is not None and spec["num_classes"] != num_classes:
        raise KtrayError(
            f"model {model_dir} predicts {spec['num_classes']} classes but the "
            f"task has {num_classes}"
        )
    table = storage.read_parquet(table_uri)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = LabeledImages(table, spec["img_size"], spec["mean"], spec["std"], train=False)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_skip_none)
    model = model.to(dev, memory_format=torch.channels_last).eval()
    result = evaluate_classifier(model, loader, dev)
    result["model"] = model_dir
    return result


class ConfusionCounter:
    """A saved classifier over decoded test images: per-batch confusion counts and loss sums
    (what Ray Data actors return; :func:`metrics_from_counts` adds them up).

    Args:
        model_dir: a checkpoint folder.
        batch_size: images per forward pass.
        device: ``cuda``/``cpu``; default: cuda when available.
        amp: on GPU, the model in bf16 (a no-op on CPU).
    """

    def __init__(
        self, model_dir: str, batch_size: int = 256, device: str | None = None, amp: bool = True
    ):
        from ktray.predict import load_for_inference, normalize_on_device

        self._normalize = normalize_on_device
        self.model, self.spec, self.device, self.dtype = load_for_inference(model_dir, device, amp)
        self.batch_size = batch_size
        self.num_classes = int(self.spec["num_classes"])

    @torch.inference_mode()
    def count(self, pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """``uint8 [N, S, S, 3]`` images + labels -> (``[C, C]`` confusion, summed CE loss)."""
        c = self.num_classes
        confusion = torch.zeros(c, c, dtype=torch.int64)
        loss = 0.0
        for i in range(0, len(pixels), self.batch_size):
            x = self._normalize(
                pixels[i : i + self.batch_size],
                self.spec["mean"],
                self.spec["std"],
                self.device,
                self.dtype,
            )
            y = torch.as_tensor(labels[i : i + self.batch_size]).to(self.device).long()
            logits = self.model(x).float()
            confusion += confusion_matrix(logits.argmax(dim=1), y, c).cpu()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
        return confusion.numpy(), loss


def metrics_from_counts(confusion: np.ndarray, loss_sum: float) -> dict:
    """The metrics :func:`ktray.metrics.evaluate_classifier` returns, from summed counts."""
    confusion = np.asarray(confusion, np.int64)
    n = int(confusion.sum())
    if n == 0:
        raise KtrayError("evaluation saw no readable test images")
    support, correct = confusion.sum(axis=1), np.diagonal(confusion)
    return {
        "test_accuracy": float(correct.sum()) / n,
        "loss": loss_sum / n,
        "n": n,
        "per_class_accuracy": [
            float(correct[i]) / support[i] if support[i] else None for i in range(len(support))
        ],
        "confusion": confusion.tolist(),
    }
