"""Dense teacher predictions over view rows (the logits pass's model side for segmentation).

:class:`DensePredictor` is a :class:`ktray.predict.Predictor` for a ``seg_teacher``
checkpoint: each row's ``logits`` are the teacher's per-pixel logits resized (bilinear) to
``dense_size x dense_size`` and flattened class-major (``C * s * s`` float16: reshape to
``[C, s, s]``), its ``features`` (when asked) the dense backbone features average-pooled to
``feature_size x feature_size`` (``D * f * f``). The Parquet contract is otherwise the
classification one; a row costs ``2 * C * s^2`` bytes of logits (11 classes at 16: 5.6 KB).
"""

from __future__ import annotations

import torch

from ktray.models import read_spec
from ktray.models.dense import dense_targets
from ktray.predict import Predictor


class DensePredictor(Predictor):
    def __init__(self, model_dir: str, dense_size: int = 16, feature_size: int = 8, **kw):
        super().__init__(model_dir, **kw)
        self.dense_size, self.feature_size = int(dense_size), int(feature_size)
        self.classes = self.num_classes
        # the row widths of the two list columns (what output_schema sizes them by)
        self.num_classes = self.classes * self.dense_size**2
        if self.features:
            self.feature_dim = int(self.model.feature_dim) * self.feature_size**2

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # (Predictor.forward / predict_pixels call this; outputs stay on the device)
        x = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        logits, feats = dense_targets(
            self.model, x, self.dense_size, self.feature_size if self.features else 0
        )
        logits = logits.reshape(len(x), -1).to(torch.float16)
        if feats is None:
            return logits, None
        return logits, feats.reshape(len(x), -1).to(torch.float16)


def make_predictor(model_dir: str, dense_size: int = 16, feature_size: int = 8, **kw) -> Predictor:
    """A :class:`DensePredictor` for a segmentation teacher, else a plain Predictor."""
    if read_spec(model_dir)["kind"] == "seg_teacher":
        return DensePredictor(model_dir, dense_size, feature_size, **kw)
    return Predictor(model_dir, **kw)
