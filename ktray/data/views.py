"""Views: resolution-free crop boxes plus a flip, sampled deterministically, and transforms.

A view is sampled from ``(seed, image_id, view index)`` alone, so the teacher (at its input
size) and the student (at its own) can each resize exactly the same box of the same image, in
different processes and at different times.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ktray.data import columns as C

if TYPE_CHECKING:  # torch is imported where a tensor is made: decode workers never need it
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _f32(x: float) -> float:
    # Round to float32 so a view stored in a float32 Parquet column is reproduced exactly.
    return float(np.float32(x))


@dataclass(frozen=True)
class ViewParams:
    """A crop box in normalised image coordinates and a horizontal flip.

    Attributes:
        x0: Left edge, in [0, 1] as a fraction of the image width.
        y0: Top edge, in [0, 1] as a fraction of the image height.
        x1: Right edge (> x0).
        y1: Bottom edge (> y0).
        flip: Whether the crop is mirrored left-right after resizing.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    flip: bool = False

    @classmethod
    def full(cls) -> ViewParams:
        """The whole image, unflipped."""
        return cls(0.0, 0.0, 1.0, 1.0, False)

    def as_dict(self) -> dict:
        """``{"x0", "y0", "x1", "y1", "flip"}`` as stored in the logits tables."""
        return asdict(self)


def _rng(seed: int, image_id: str, view: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}\x1f{image_id}\x1f{view}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def sample_view(
    seed: int,
    image_id: str,
    view: int,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    first_view_full: bool = False,
) -> ViewParams:
    """Sample a random-resized-crop view, deterministic in ``(seed, image_id, view)``.

    Area and aspect ratio are sampled in normalised coordinates (RandomResizedCrop on a unit
    square), so a view does not depend on the image resolution.

    Args:
        seed: Run seed.
        image_id: The image's id.
        view: View index (0, 1, ...).
        scale: Range of the box area as a fraction of the image.
        ratio: Range of the box aspect ratio (width / height), sampled log-uniformly.
        flip: Whether to flip with probability 0.5.
        first_view_full: Return the full unflipped image for ``view == 0``.

    Returns:
        The view, with coordinates rounded to float32 precision.
    """
    if first_view_full and view == 0:
        return ViewParams.full()
    rng = _rng(seed, image_id, view)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(lo, hi))
        w, h = math.sqrt(area * r), math.sqrt(area / r)
        if w <= 1.0 and h <= 1.0:
            break
    else:
        w, h = min(w, 1.0), min(h, 1.0)
    x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
    do_flip = flip and rng.random() < 0.5
    x0, y0 = _f32(x0), _f32(y0)
    return ViewParams(x0, y0, _f32(min(x0 + w, 1.0)), _f32(min(y0 + h, 1.0)), bool(do_flip))


def normalized_array(a: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``uint8`` channels-first pixels (``[3, H, W]`` or ``[N, 3, H, W]``) as normalised
    float32: ``(a - 255 mean) / (255 std)``, the arithmetic every CPU input path shares."""
    shape = (-1, 1, 1)
    m = np.asarray(mean, dtype=np.float32).reshape(shape) * 255.0
    s = np.asarray(std, dtype=np.float32).reshape(shape) * 255.0
    out = np.empty(a.shape, dtype=np.float32)
    np.subtract(a, m, out=out, casting="unsafe")
    out /= s
    return out


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB image as a normalised float tensor ``[3, H, W]``."""
    # numpy, not torch: per-image ops this small are slower through torch's intra-op threads,
    # badly so when DataLoader workers compete for a few cores.
    out = normalized_array(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), mean, std)
    import torch

    return torch.from_numpy(out)


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white rather than on whatever colour they hide.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8))
    return img.convert("RGB")


def apply_view(
    img: Image.Image, params: ViewParams, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Crop a view from an image, resize it, flip it and normalise it.

    Args:
        img: Any PIL image (grayscale, palette and alpha images become RGB).
        params: The view.
        size: Output side in pixels.
        mean: Per-channel mean (3 values, or 1 for all channels) in [0, 1] units.
        std: Per-channel standard deviation, same shape as ``mean``.

    Returns:
        ``[3, size, size]`` float32 tensor.
    """
    return to_tensor(crop_view(img, params, size), mean, std)


def crop_view(img: Image.Image, params: ViewParams, size: int) -> Image.Image:
    """The view of ``img`` as a ``size x size`` RGB image (cropped, resized, flipped; not
    normalised): what :func:`apply_view` normalises, and what the inference passes' decode
    stage ships to the model actors as uint8."""
    img = _rgb(img)
    w, h = img.size
    x0, y0, x1, y1 = params.x0 * w, params.y0 * h, params.x1 * w, params.y1 * h
    # Crop to the enclosing whole pixels first so the filter cannot reach pixels outside the
    # view, then let resize(box=...) sample the exact sub-pixel box (antialiased when shrinking).
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(w, max(ix0 + 1, math.ceil(x1))), min(h, max(iy0 + 1, math.ceil(y1)))
    if (ix0, iy0, ix1, iy1) != (0, 0, w, h):
        img = img.crop((ix0, iy0, ix1, iy1))
    box = (x0 - ix0, y0 - iy0, max(x1 - ix0, x0 - ix0 + 1e-3), max(y1 - iy0, y0 - iy0 + 1e-3))
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def eval_transform(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The full image resized to ``size x size`` and normalised: ``[3, size, size]``."""
    return apply_view(img, ViewParams.full(), size, mean, std)


def view_from_row(row: dict) -> ViewParams:
    """The view stored in a row dict with ``x0, y0, x1, y1, flip`` (full image if absent)."""
    if C.BOX[0] not in row:
        return ViewParams.full()
    x0, y0, x1, y1 = (float(row[k]) for k in C.BOX)
    return ViewParams(x0, y0, x1, y1, bool(row.get(C.FLIP, False)))
