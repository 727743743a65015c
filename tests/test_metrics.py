"""Metrics against hand-computed values."""

import math

import pytest
import torch
import torch.nn as nn

from ktray.errors import KtrayError
from ktray.metrics import accuracy, confusion_matrix, evaluate_classifier, top_k_accuracy

# rows: argmax 0, 2, 1, 2 ; second best 1, 1, 2, 0
LOGITS = torch.tensor(
    [
        [3.0, 2.0, 1.0],
        [0.0, 1.0, 2.0],
        [1.0, 3.0, 2.0],
        [2.0, 0.0, 3.0],
    ]
)
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy_and_top_k_hand_values():
    assert accuracy(LOGITS, LABELS) == pytest.approx(2 / 4)  # rows 0 and 2 right
    assert top_k_accuracy(LOGITS, LABELS, k=1) == pytest.approx(2 / 4)
    assert top_k_accuracy(LOGITS, LABELS, k=2) == pytest.approx(4 / 4)
    assert top_k_accuracy(LOGITS, torch.tensor([2, 0, 0, 1]), k=2) == pytest.approx(0.0)
    assert top_k_accuracy(LOGITS, LABELS, k=3) == 1.0


def test_metric_errors():
    with pytest.raises(KtrayError, match="k <= 3"):
        top_k_accuracy(LOGITS, LABELS, k=5)
    with pytest.raises(KtrayError, match="empty"):
        accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(KtrayError, match=r"logits \[B, C\] and labels \[B\]"):
        accuracy(LOGITS, LABELS[:3])
    with pytest.raises(KtrayError, match=r"labels must lie in \[0, 3\)"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)


def test_confusion_matrix_rows_are_true_labels():
    conf = confusion_matrix(LOGITS.argmax(1), LABELS, 3)
    assert conf.tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]


class Fixed(nn.Module):
    """Returns the logits stored for each input index; records the mode it was called in."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)
        self.scale = nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, idx):
        self.modes.append(self.training)
        return self.table[idx] * self.scale


def test_evaluate_classifier_hand_values():
    model = Fixed(LOGITS)
    model.train()
    loader = [(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([2, 3]), [1, 0])]
    out = evaluate_classifier(model, loader, "cpu")

    def ce(row, label):
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    expected_loss = sum(ce(r, int(y)) for r, y in zip(LOGITS.tolist(), LABELS)) / 4
    assert out["n"] == 4
    assert out["test_accuracy"] == pytest.approx(0.5)
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert out["confusion"] == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert out["per_class_accuracy"] == [0.5, 0.5, None]  # class 2 has no test images
    assert model.modes == [False, False] and model.training  # evaluated in eval, mode restored


def test_evaluate_classifier_errors():
    with pytest.raises(KtrayError, match="no batches"):
        evaluate_classifier(Fixed(LOGITS), [], "cpu")
    with pytest.raises(KtrayError, match="expected 5"):
        evaluate_classifier(
            Fixed(LOGITS), [(torch.tensor([0]), torch.tensor([0]))], "cpu", num_classes=5
        )
