"""Segmentation logits -> a mask at the image's own size (numpy + PIL only: no torch, no ray).

What ktray evaluates (:func:`ktray.seg_metrics.upsample_logits`, then ``argmax``): the logits
``[C, h, w]`` resized to the image's ``H x W`` with torch's bilinear interpolation
(``align_corners=False``, no antialias: half-pixel centres, source coordinates clamped at 0),
then the argmax over classes (the first class on ties). Done one class at a time, so memory is
``O(H * W)`` whatever ``C``. Computed in float64, it differs from torch's float32 kernel by
rounding only (max abs difference ~2e-6 on unit-scale logits), so the masks agree except at
near-ties (11 random classes from 16 x 16: 1 pixel of 307,200 at 640 x 480, 2 of 2,073,600 at
1920 x 1080; none in the tests). ``ktray predict`` and the MLflow segmenter (:mod:`ktray.serving`,
which pickles this module by value) both call :func:`logits_to_mask`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0, i1`` and the weight of ``i1`` of each output position."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0


def resize_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w] -> [H, W]`` float64, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes it."""
    a = np.asarray(a, np.float64)
    (h, w), (oh, ow) = a.shape, size
    if (h, w) == (oh, ow):
        return a
    r0, r1, rl = _axis(h, oh)
    c0, c1, cl = _axis(w, ow)
    rows = a[r0] * (1.0 - rl)[:, None] + a[r1] * rl[:, None]  # [H, w]
    return rows[:, c0] * (1.0 - cl) + rows[:, c1] * cl


def logits_to_mask(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[C, h, w]`` logits -> the ``[H, W]`` class-index mask at ``size = (H, W)``: each
    class's logits resized bilinearly to ``size``, then the argmax (``uint8``; ``uint16``
    beyond 256 classes)."""
    logits = np.asarray(logits)
    if logits.ndim != 3 or not len(logits):
        raise ValueError(f"logits must be [C, h, w], got shape {logits.shape}")
    best = resize_bilinear(logits[0], size)
    mask = np.zeros(best.shape, np.uint8 if len(logits) <= 256 else np.uint16)
    for c in range(1, len(logits)):
        up = resize_bilinear(logits[c], size)
        better = up > best  # strict: the first class wins ties, as argmax
        mask[better] = c
        best = np.where(better, up, best)
    return mask


def mask_png(mask: np.ndarray) -> bytes:
    """A class-index mask as PNG bytes (8-bit grey, or 16-bit beyond 256 classes);
    ``np.asarray(Image.open(io.BytesIO(png)))`` gives it back."""
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()
