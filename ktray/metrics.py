"""Classification metrics and the evaluation loop used by the finetune and evaluate stages."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ktray.errors import KtrayError

__all__ = ["accuracy", "top_k_accuracy", "confusion_matrix", "evaluate_classifier"]


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise KtrayError(
            f"expected logits [B, C] and labels [B], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise KtrayError("cannot compute accuracy of an empty batch")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of logits [B, C] against integer labels [B]."""
    return top_k_accuracy(logits, labels, k=1)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Fraction of rows whose label is among the k highest logits.

    Raises KtrayError when k exceeds the class count (which would make the metric 1.0).
    """
    _check(logits, labels)
    if not 1 <= k <= logits.shape[1]:
        raise KtrayError(f"top-k accuracy needs 1 <= k <= {logits.shape[1]} classes, got k={k}")
    top = logits.topk(k, dim=1).indices
    hit = (top == labels.to(top.device).unsqueeze(1)).any(dim=1)
    return hit.float().mean().item()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true label, column = predicted label."""
    labels = labels.to(preds.device).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise KtrayError(
            f"labels must lie in [0, {num_classes}) for a {num_classes}-class model, got "
            f"[{labels.min().item()}, {labels.max().item()}]"
        )
    flat = labels * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device,
    num_classes: int | None = None,
) -> dict:
    """Evaluate ``model(x) -> logits [B, C]`` over a loader of ``(x, y)`` batches.

    The model is put in eval mode and restored to its previous mode afterwards.

    Args:
        model: classifier already on ``device``.
        loader: yields ``(x [B, ...], y [B])``; labels must be >= 0.
        device: where batches are moved.
        num_classes: C; inferred from the logits when None.

    Returns:
        ``{"test_accuracy": float, "loss": mean cross-entropy, "n": int,
        "per_class_accuracy": [C] floats (None for a class with no test images),
        "confusion": [C][C] ints (row = true, column = predicted)}``.
    """
    was_training = model.training
    model.eval()
    confusion: torch.Tensor | None = None
    loss_sum, n = 0.0, 0
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if x.dim() == 4:  # matches a channels_last model; a no-op cost otherwise
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(y).to(device, non_blocking=True).long()
            logits = model(x).float()
            _check(logits, y)
            c = num_classes or logits.shape[1]
            if logits.shape[1] != c:
                raise KtrayError(f"model gives {logits.shape[1]} classes, expected {c}")
            batch = confusion_matrix(logits.argmax(dim=1), y, c)
            confusion = batch if confusion is None else confusion + batch
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            n += y.shape[0]
    finally:
        model.train(was_training)
    if confusion is None:
        raise KtrayError("evaluation loader yielded no batches")

    confusion = confusion.cpu()
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class = [
        (correct[i].item() / support[i].item()) if support[i] > 0 else None
        for i in range(confusion.shape[0])
    ]
    return {
        "test_accuracy": correct.sum().item() / n,
        "loss": loss_sum / n,
        "n": n,
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
    }
