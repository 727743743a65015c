"""Crop boxes for crop-level retrieval.

Queries and gallery images use the same scheme: the full image first, then grid crops and
random crops at the given scales. Boxes are normalised ``(x0, y0, x1, y1)`` with
``0 <= x0 < x1 <= 1``, so they are resolution-free like :class:`ViewParams`: the embedding
model resizes the box to its own input size. A scale ``s`` is the side of the box as a
fraction of the image side (a box covers ``s**2`` of the area). :func:`decode_crops` cuts a
scheme's crops out of decoded images: the CPU stage of the embedding pass, which like this
module imports no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from ktray.data import columns as C
from ktray.data.sources import load_images
from ktray.data.views import ViewParams, crop_view
from ktray.errors import KtrayError

Box = tuple[float, float, float, float]
FULL_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)


def _rng(seed: int, image_id: str) -> np.random.Generator:
    # hashlib, not hash(): Python's string hash changes between processes.
    digest = hashlib.blake2b(f"{int(seed)}\0{image_id}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def crop_boxes(
    n_random: int = 0,
    grid: int = 0,
    scales: tuple[float, ...] = (0.5,),
    seed: int = 0,
    image_id: str = "",
) -> list[Box]:
    """Crop boxes of one image, deterministic per ``(seed, image_id)``.

    Args:
        n_random: number of random crops; crop ``j`` uses ``scales[j % len(scales)]`` and a
            uniformly random position.
        grid: ``grid x grid`` evenly spaced crops at every scale (0 = none; 1 = centred crop).
        scales: box sides as fractions of the image side, each in ``(0, 1]``.
        seed: run seed.
        image_id: the image's id; different images get different random crops.

    Returns:
        ``[(x0, y0, x1, y1), ...]``: the full image first, then the grid crops scale by scale
        (row-major), then the random crops. Boxes identical to an earlier one are dropped, so
        a scale of 1 does not repeat the full image.
    """
    if n_random < 0 or grid < 0:
        raise KtrayError(f"crop counts must be >= 0, got n_random={n_random}, grid={grid}")
    scales = tuple(float(s) for s in scales)
    if (n_random or grid) and not scales:
        raise KtrayError("crop scales are empty but grid or random crops were asked for")
    for s in scales:
        if not 0.0 < s <= 1.0:
            raise KtrayError(f"crop scale {s} is outside (0, 1]")

    boxes: list[Box] = [FULL_IMAGE]
    for s in scales if grid else ():
        offsets = [(1.0 - s) / 2] if grid == 1 else np.linspace(0.0, 1.0 - s, grid).tolist()
        for y0 in offsets:
            for x0 in offsets:
                boxes.append(_box(x0, y0, s))
    if n_random:
        rng = _rng(seed, image_id)
        pos = rng.random((n_random, 2))
        for j in range(n_random):
            s = scales[j % len(scales)]
            boxes.append(_box(pos[j, 0] * (1.0 - s), pos[j, 1] * (1.0 - s), s))

    seen: set[Box] = set()
    unique = []
    for b in boxes:
        if b not in seen:
            seen.add(b)
            unique.append(b)
    return unique


def _box(x0: float, y0: float, s: float) -> Box:
    # Clamp against float drift so x1 never exceeds 1.
    x0, y0 = max(0.0, float(x0)), max(0.0, float(y0))
    return (x0, y0, min(1.0, x0 + s), min(1.0, y0 + s))


def crop_id(image_id: str, index: int) -> str:
    """The ``crop_id`` of crop ``index`` (position in :func:`crop_boxes`) of an image."""
    return f"{image_id}@{int(index)}"


GALLERY_INDEX = "gallery_index"
INPUT_COLUMNS = [GALLERY_INDEX, C.IMAGE_ID, C.SOURCE]


@dataclass(frozen=True)
class CropScheme:
    """Which crops of an image are embedded (see :func:`ktray.retrieval.crop_boxes`).

    ``full_only`` embeds the full image alone (used for protected images, whose near
    duplicates are looked for among every gallery crop).
    """

    random_crops: int = 0
    grid: int = 0
    scales: tuple[float, ...] = (0.5,)
    seed: int = 0
    full_only: bool = False

    def boxes(self, image_id: str) -> list[Box]:
        if self.full_only:
            return [FULL_IMAGE]
        return crop_boxes(self.random_crops, self.grid, tuple(self.scales), self.seed, image_id)

    def crops_per_image(self) -> int:
        """Crops of one image (random crops never repeat a box, so this holds for every id)."""
        return len(self.boxes(""))

    def as_dict(self) -> dict:
        return asdict(self)


OUTPUT_COLUMNS = (GALLERY_INDEX, C.IMAGE_ID, C.CROP_ID, *C.BOX)


def decode_crops(
    rows: pa.Table, scheme: CropScheme, size: int
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Decode image rows and cut every crop of ``scheme`` to ``uint8 [size, size, 3]``.

    Returns:
        ``(columns, pixels [N, size, size, 3], ok [N])``: one entry per crop of a readable
        image (images in input order, crops in box order) and one ``ok=False`` entry (zeros)
        per unreadable image.
    """
    pylist = rows.select(INPUT_COLUMNS).to_pylist()
    cols: dict[str, list] = {k: [] for k in OUTPUT_COLUMNS}
    pixels, ok = [], []
    blank = np.zeros((size, size, 3), np.uint8)
    for r, img in zip(pylist, load_images([r[C.SOURCE] for r in pylist])):
        boxes = scheme.boxes(r[C.IMAGE_ID]) if img is not None else [FULL_IMAGE]
        for j, box in enumerate(boxes):
            pixels.append(
                blank
                if img is None
                else np.asarray(crop_view(img, ViewParams(*box), size), np.uint8)
            )
            ok.append(img is not None)
            for k, v in zip(
                OUTPUT_COLUMNS, (r[GALLERY_INDEX], r[C.IMAGE_ID], crop_id(r[C.IMAGE_ID], j), *box)
            ):
                cols[k].append(v)
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return cols, stacked, np.asarray(ok, bool)
