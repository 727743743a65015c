"""Semantic segmentation data: mask folders, mask checks, joint image + mask views, and the
offline Fashion-MNIST mosaic task (no ray, no Config here).

Layout read by :func:`read_segfolder` (``data.kind=segfolder``)::

    DIR/images/{train,test}/*      images (any format PIL reads)
    DIR/masks/{train,test}/*.png   one single-channel mask per image, same stem, same size;
                                   pixel = class index, ``ignore_index`` (255) = not labeled
    DIR/unlabeled/**               optional unlabeled images (the in-domain transfer set)
    DIR/classes.txt                optional class names, one a line, in index order

A segmentation image table is an image table (``image_id, source, label`` with label -1) plus a
``mask`` column: the mask's file path or URI, or ``URI#ROW:COLUMN`` for a mask stored as PNG
bytes in a Parquet cell (``data.kind=segparquet``, :mod:`ktray.data.seg_parquet`).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from ktray import storage
from ktray.data import columns as C
from ktray.data import seg_parquet
from ktray.data.listing import IMAGE_EXTENSIONS
from ktray.data.readers import FASHION_MNIST_CLASSES
from ktray.data.sources import load_image_strict
from ktray.data.views import ViewParams, crop_view, sample_view, to_tensor
from ktray.errors import KtrayError

MASK = "mask"
"""Column of a segmentation image table: the mask file of each image."""
SEG_KINDS = ("segfolder", "segparquet", "fashion_mosaic")
"""``data.kind`` values that make a segmentation task."""


def is_segmentation(kind: str) -> bool:
    """Whether ``data.kind`` makes a segmentation task."""
    return kind in SEG_KINDS


def _list(uri: str, exts: Sequence[str]) -> list[str]:
    """Files under ``uri`` (recursively) with one of ``exts``, sorted, as URIs."""
    fs, path = storage.fs_and_path(uri)
    if not fs.exists(path):
        return []
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(prefix + p for p in fs.find(path) if p.lower().endswith(tuple(exts)))


def _stem(uri: str, root: str) -> str:
    rel = uri[len(root.rstrip("/")) + 1 :]
    return os.path.splitext(rel)[0]


def read_segfolder_split(root: str, split: str) -> pa.Table:
    """``root/images/<split>`` paired with ``root/masks/<split>`` by relative stem.

    Raises:
        KtrayError: No images, or an image without a mask (the first one named).
    """
    img_root = storage.join(root, "images", split)
    mask_root = storage.join(root, "masks", split)
    images = _list(img_root, IMAGE_EXTENSIONS)
    if not images:
        raise KtrayError(f"no images in {img_root} (expected images/{split}/*)")
    masks = {_stem(m, mask_root): m for m in _list(mask_root, (".png",))}
    rows = {C.IMAGE_ID: [], C.SOURCE: [], MASK: []}
    for uri in images:
        stem = _stem(uri, img_root)
        if stem not in masks:
            raise KtrayError(
                f"image {uri} has no mask (expected {storage.join(mask_root, stem + '.png')})"
            )
        rows[C.IMAGE_ID].append(f"{split}/{stem}")
        rows[C.SOURCE].append(uri)
        rows[MASK].append(masks[stem])
    n = len(images)
    return pa.table(
        {
            C.IMAGE_ID: pa.array(rows[C.IMAGE_ID], pa.string()),
            C.SOURCE: pa.array(rows[C.SOURCE], pa.string()),
            C.LABEL: pa.array([C.UNLABELED] * n, pa.int64()),
            MASK: pa.array(rows[MASK], pa.string()),
        }
    )


def read_unlabeled(root: str) -> pa.Table | None:
    """``root/unlabeled/**`` as an image table (None when absent or empty)."""
    uris = _list(storage.join(root, "unlabeled"), IMAGE_EXTENSIONS)
    if not uris:
        return None
    return pa.table(
        {
            C.IMAGE_ID: pa.array(
                [f"unlabeled/{_stem(u, storage.join(root, 'unlabeled'))}" for u in uris],
                pa.string(),
            ),
            C.SOURCE: pa.array(uris, pa.string()),
            C.LABEL: pa.array([C.UNLABELED] * len(uris), pa.int64()),
        }
    )


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Encoded mask bytes as ``uint8 [H, W]`` class indices (``name`` for error messages).

    Raises:
        KtrayError: Undecodable, not single-channel, or values above 255.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad mask
        raise KtrayError(f"mask {name} cannot be read: {type(e).__name__}: {e}") from None
    if img.mode not in ("L", "P", "I", "I;16", "1"):
        raise KtrayError(
            f"mask {name} has mode {img.mode}: masks must be single-channel (pixel = class index)"
        )
    a = np.asarray(img)
    if a.ndim != 2:
        raise KtrayError(f"mask {name} is not single-channel (shape {a.shape})")
    if a.max(initial=0) > 255:
        raise KtrayError(f"mask {name} has value {int(a.max())} > 255")
    return a.astype(np.uint8)


def load_masks(uris: Sequence[str]) -> list[np.ndarray]:
    """Masks (files, or Parquet cells ``URI#ROW:COLUMN``) as ``uint8 [H, W]`` class indices.

    Raises:
        KtrayError: One line naming the first unreadable, null or malformed mask.
    """
    uris = list(uris)
    out: list[np.ndarray | None] = [None] * len(uris)
    cells = [i for i, u in enumerate(uris) if seg_parquet.parse_mask_ref(u)]
    for i, data in zip(cells, seg_parquet.read_masks_bytes([uris[i] for i in cells])):
        name = seg_parquet.describe(uris[i])
        if data is None:
            raise KtrayError(f"mask {name} is null (every labeled row needs a mask)")
        out[i] = decode_mask(data, name)
    for i, uri in enumerate(uris):
        if out[i] is None:
            try:
                data = storage.read_bytes(uri)
            except Exception as e:  # noqa: BLE001 - a missing or unreadable mask file
                raise KtrayError(f"mask {uri} cannot be read: {type(e).__name__}: {e}") from None
            out[i] = decode_mask(data, uri)
    return out


def load_mask(uri: str) -> np.ndarray:
    """One mask (see :func:`load_masks`)."""
    return load_masks([uri])[0]


def image_size(uri: str) -> tuple[int, int]:
    """``(width, height)`` of an image file, reading its header only."""
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        return img.size


def _image_sizes(sources: list[str]) -> list[tuple[int, int]]:
    sizes = seg_parquet.image_sizes(sources)
    for k, src in enumerate(sources):
        if sizes[k] is None:
            try:
                sizes[k] = image_size(src)
            except Exception as e:  # noqa: BLE001
                raise KtrayError(f"image {src} cannot be read: {type(e).__name__}: {e}") from None
    return sizes


def check_masks(
    table: pa.Table, num_classes: int | None, ignore_index: int, batch: int = 256
) -> tuple[int, np.ndarray]:
    """Every mask of ``table`` is readable, of its image's size, and holds only class ids
    below ``num_classes`` (when given) or ``ignore_index``. Read ``batch`` rows at a time.

    Returns:
        ``(the largest class id seen, pixel count per class id 0..255)``.

    Raises:
        KtrayError: One line naming the first bad mask (file, or Parquet file and row).
    """
    counts = np.zeros(256, np.int64)
    sources, mask_uris = table[C.SOURCE].to_pylist(), table[MASK].to_pylist()
    for b in range(0, len(sources), batch):
        srcs, uris = sources[b : b + batch], mask_uris[b : b + batch]
        for src, mask_uri, m, (w, h) in zip(srcs, uris, load_masks(uris), _image_sizes(srcs)):
            name = seg_parquet.describe(mask_uri)
            if (m.shape[1], m.shape[0]) != (w, h):
                raise KtrayError(
                    f"mask {name} is {m.shape[1]}x{m.shape[0]} but its image {src} is {w}x{h}"
                )
            values = np.bincount(m.reshape(-1), minlength=256)
            if num_classes is not None:
                bad = [v for v in np.flatnonzero(values) if v >= num_classes and v != ignore_index]
                if bad:
                    raise KtrayError(
                        f"mask {name} has class id {int(bad[0])}, outside "
                        f"0..{num_classes - 1} and not the ignore index {ignore_index}"
                    )
            counts += values
    seen = [v for v in np.flatnonzero(counts) if v != ignore_index]
    return (int(max(seen)) if seen else -1), counts


def read_segparquet_split(uri: str, mask_column: str) -> pa.Table:
    """Parquet files (``uri``: file, folder or glob) of image bytes + PNG mask bytes in
    ``mask_column`` as a segmentation image table (see :mod:`ktray.data.seg_parquet`)."""
    return seg_parquet.read_split(uri, mask_column, MASK)


# -- views of an image and its mask ---------------------------------------------------------


def crop_mask(mask: np.ndarray, params: ViewParams, size: int) -> np.ndarray:
    """The view of a mask as ``uint8 [size, size]`` (nearest neighbour: no new class ids)."""
    h, w = mask.shape
    img = Image.fromarray(mask)
    box = (params.x0 * w, params.y0 * h, params.x1 * w, params.y1 * h)
    out = img.resize((size, size), Image.Resampling.NEAREST, box=box)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8)


class SegImages(Dataset):
    """A segmentation image table as ``(x [3, S, S] float32, mask [S, S] int64)`` items.

    Training items are a fresh random view (crop box + flip) applied to the image (bilinear)
    and its mask (nearest); evaluation items are the full image at ``size`` and the full mask
    at its own resolution (``mask_size`` = None) or resized to ``mask_size``.
    Images and masks are decoded once, at construction (the labeled sets are small).
    """

    def __init__(
        self,
        table: pa.Table,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
        scale: tuple[float, float] = (0.5, 1.0),
        mask_size: int | None = None,
    ):
        if MASK not in table.column_names:
            raise KtrayError("segmentation table lacks the mask column")
        self.ids = table[C.IMAGE_ID].to_pylist()
        self.images = [load_image_strict(s) for s in table[C.SOURCE].to_pylist()]
        self.masks = load_masks(table[MASK].to_pylist())
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.train, self.seed, self.scale, self.mask_size = bool(train), int(seed), scale, mask_size

    def __len__(self) -> int:
        return len(self.images)

    def view(self, i: int, params: ViewParams, mask_size: int | None = None):
        x = to_tensor(crop_view(self.images[i], params, self.size), self.mean, self.std)
        ms = mask_size or self.size
        return x, torch.from_numpy(crop_mask(self.masks[i], params, ms).astype(np.int64))

    def __getitem__(self, i: int):
        if self.train:
            v = int(torch.randint(0, 2**62, ()).item())
            return self.view(i, sample_view(self.seed, self.ids[i], v, self.scale))
        full = ViewParams.full()
        if self.mask_size:
            return self.view(i, full, self.mask_size)
        x = to_tensor(crop_view(self.images[i], full, self.size), self.mean, self.std)
        return x, torch.from_numpy(self.masks[i].astype(np.int64))


def collate_seg(items):
    """Batch of ``(x, mask)``: masks of different sizes stay a list."""
    xs = torch.stack([x for x, _ in items])
    masks = [m for _, m in items]
    if len({tuple(m.shape) for m in masks}) == 1:
        return xs, torch.stack(masks)
    return xs, masks


# -- the offline Fashion-MNIST mosaic task --------------------------------------------------


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(root: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        if os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    raise KtrayError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")


def fashion_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` (train / test) images ``[N, 28, 28]`` and labels ``[N]``."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
    return images, labels.astype(np.int64)


def make_mosaic(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    size: int = 64,
    max_items: int = 4,
    threshold: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """One mosaic: ``(uint8 RGB [size, size, 3], uint8 mask [size, size])``.

    1..``max_items`` garments at random positions and scales (18-40 px at 64) on a textured
    background; a garment's foreground pixels (> ``threshold``) get its class + 1, later
    garments cover earlier ones, everything else is background (0).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b, c = rng.uniform(0, 40, 3)
    canvas = a * xx + b * yy + c + rng.normal(0, 6, (size, size))
    canvas = np.clip(canvas, 0, 255)
    tint = rng.uniform(0.6, 1.0, 3)
    rgb = np.stack([canvas * t for t in tint], -1)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, max_items + 1))):
        i = int(rng.integers(len(images)))
        side = int(rng.integers(int(size * 0.28), int(size * 0.62) + 1))
        g = np.asarray(
            Image.fromarray(images[i]).resize((side, side), Image.Resampling.BILINEAR), np.float32
        )
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        fg = g > threshold
        color = rng.uniform(0.55, 1.0, 3)
        region = rgb[y0 : y0 + side, x0 : x0 + side]
        for ch in range(3):
            region[..., ch] = np.where(fg, g * color[ch], region[..., ch])
        mask[y0 : y0 + side, x0 : x0 + side][fg] = labels[i] + 1
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def build_fashion_mosaics(
    fmnist_root: str,
    out_dir: str,
    train: int,
    unlabeled: int,
    test: int,
    size: int = 64,
    seed: int = 0,
) -> str:
    """Write the mosaic task as a segfolder under ``out_dir`` (local) and return it.

    Train and unlabeled mosaics use Fashion-MNIST's train garments, test mosaics its test
    garments. Deterministic in ``seed``; an existing complete folder is reused.
    """
    done = os.path.join(out_dir, "COMPLETE")
    key = f"{train} {unlabeled} {test} {size} {seed}\n"
    if os.path.exists(done) and open(done).read() == key:
        return out_dir
    tr_images, tr_labels = fashion_arrays(fmnist_root, "train")
    te_images, te_labels = fashion_arrays(fmnist_root, "test")
    rng = np.random.default_rng(seed)
    plan = (
        ("images/train", "masks/train", train, tr_images, tr_labels),
        ("unlabeled", None, unlabeled, tr_images, tr_labels),
        ("images/test", "masks/test", test, te_images, te_labels),
    )
    for img_dir, mask_dir, n, images, labels in plan:
        os.makedirs(os.path.join(out_dir, img_dir), exist_ok=True)
        if mask_dir:
            os.makedirs(os.path.join(out_dir, mask_dir), exist_ok=True)
        for k in range(n):
            rgb, mask = make_mosaic(rng, images, labels, size)
            Image.fromarray(rgb).save(os.path.join(out_dir, img_dir, f"{k:06d}.png"))
            if mask_dir:
                Image.fromarray(mask).save(os.path.join(out_dir, mask_dir, f"{k:06d}.png"))
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(("background", *FASHION_MNIST_CLASSES)) + "\n")
    with open(done, "w") as f:
        f.write(key)
    return out_dir
