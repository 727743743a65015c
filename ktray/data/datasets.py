"""PyTorch datasets over image tables.

- :class:`LabeledImages`: the small labeled sets (teacher head, finetuning, evaluation); a
  fresh random view per item when training, the full image when evaluating. An unreadable
  labeled image is an error.
- :class:`ViewImages`: rows of teacher predictions; every item is the stored view, with the
  stored logits / features as targets. An unreadable transfer image is skipped
  (:func:`collate_skip_none`).
- :class:`DecodeViews` (in the torch-free :mod:`ktray.data.decode`): the streaming
  counterpart of ``ViewImages`` for distillation: a batch of view rows -> ``uint8`` pixels
  (+ float16 targets), run by Ray Data's CPU decode stage (or in-process by
  :class:`ViewStream`); the training device normalises (:func:`normalize`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ktray.data import columns as C
from ktray.data.decode import DecodeViews, list_column_matrix
from ktray.data.decode import require_columns as _require
from ktray.data.sources import load_image_strict, load_images
from ktray.data.views import ViewParams, apply_view, eval_transform, sample_view
from ktray.errors import CorruptImageError


def preload(table: pa.Table) -> list[Image.Image]:
    """Decode every image of a (small) image table into memory.

    Raises:
        CorruptImageError: An image cannot be read; the message names its source.
    """
    sources = table.column(C.SOURCE).to_pylist()
    images = load_images(sources)
    for src, img in zip(sources, images):
        if img is None:
            load_image_strict(src)  # raises with the reason
            raise CorruptImageError(f"unreadable image {src}")  # pragma: no cover (flaky file)
    return images


class LabeledImages(Dataset):
    """A labeled image table as ``(x, label)`` items.

    Args:
        table: Image table (``image_id``, ``source``, ``label``).
        size: Output side in pixels.
        mean: Normalisation mean (3 values in [0, 1] units).
        std: Normalisation standard deviation.
        train: If True each item is a fresh random view (:func:`sample_view` with a view index
            drawn from torch's RNG, so ``torch.manual_seed`` and DataLoader worker seeding make
            runs reproducible); if False the full image (:func:`eval_transform`).
        seed: Seed of the view sampler.
        cache: Decode all images once at construction and keep them in memory.
        scale: View area range (train only).
        ratio: View aspect ratio range (train only).
        flip: Random horizontal flips (train only).

    Items:
        ``x``: float32 ``[3, size, size]``; ``label``: int.

    Raises:
        CorruptImageError: An image cannot be read (at construction when ``cache=True``).
    """

    def __init__(
        self,
        table: pa.Table,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
        cache: bool = False,
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ):
        _require(table, (C.IMAGE_ID, C.SOURCE, C.LABEL), "labeled image table")
        self.image_ids = table.column(C.IMAGE_ID).to_pylist()
        self.sources = table.column(C.SOURCE).to_pylist()
        self.labels = [int(v) for v in table.column(C.LABEL).to_pylist()]
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.train, self.seed = bool(train), int(seed)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), bool(flip)
        self.images = preload(table) if cache else None

    def __len__(self) -> int:
        return len(self.sources)

    def image(self, i: int) -> Image.Image:
        """The decoded image of row ``i`` (raises CorruptImageError naming it)."""
        if self.images is not None:
            return self.images[i]
        return load_image_strict(self.sources[i])

    def view(self, i: int, view: int) -> torch.Tensor:
        """Row ``i`` under the deterministic view ``view``: ``[3, size, size]``."""
        params = sample_view(self.seed, self.image_ids[i], view, self.scale, self.ratio, self.flip)
        return apply_view(self.image(i), params, self.size, self.mean, self.std)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.train:
            x = self.view(i, int(torch.randint(0, 2**62, ()).item()))
        else:
            x = eval_transform(self.image(i), self.size, self.mean, self.std)
        return x, self.labels[i]


class ViewImages(Dataset):
    """Stored views (and their teacher targets) as dict items.

    Args:
        rows: Table with ``image_id``, ``source`` and optionally ``x0, y0, x1, y1, flip``
            (absent: the full image), ``logits``, ``features``, ``label``, ``view``.
        size: Output side in pixels.
        mean: Normalisation mean.
        std: Normalisation standard deviation.
        targets: Which of ``logits`` / ``features`` to return when present (features can be
            large: leave them out when the loss does not use them).

    Items:
        ``None`` for an unreadable image, else a dict with ``x`` (float32 ``[3, size, size]``),
        ``index`` (row number) and, when present, ``logits`` (``[C]``), ``features``
        (``[D]``), ``label`` and ``view``.
    """

    def __init__(
        self,
        rows: pa.Table,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        targets: Sequence[str] = (C.LOGITS, C.FEATURES),
    ):
        _require(rows, (C.IMAGE_ID, C.SOURCE), "view table")
        self.sources = rows.column(C.SOURCE).to_pylist()
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        n = rows.num_rows
        if C.BOX[0] in rows.column_names:
            _require(rows, C.BOX, "view table")
            self.boxes = np.stack(
                [rows.column(k).to_numpy().astype(np.float64) for k in C.BOX], axis=1
            )
        else:
            self.boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]]), (n, 1))
        self.flips = (
            np.asarray(rows.column(C.FLIP).to_pylist(), dtype=bool)
            if C.FLIP in rows.column_names
            else np.zeros(n, dtype=bool)
        )
        self.targets = {
            name: torch.from_numpy(list_column_matrix(rows.column(name), name))
            for name in targets
            if name in rows.column_names
        }
        self.extras = {
            name: rows.column(name).to_pylist()
            for name in (C.LABEL, C.VIEW)
            if name in rows.column_names
        }

    def __len__(self) -> int:
        return len(self.sources)

    def params(self, i: int) -> ViewParams:
        """The stored view of row ``i``."""
        x0, y0, x1, y1 = (float(v) for v in self.boxes[i])
        return ViewParams(x0, y0, x1, y1, bool(self.flips[i]))

    def __getitem__(self, i: int) -> dict | None:
        img = load_images([self.sources[i]])[0]
        if img is None:
            return None
        item = {"x": apply_view(img, self.params(i), self.size, self.mean, self.std), "index": i}
        for name, matrix in self.targets.items():
            item[name] = matrix[i]
        for name, values in self.extras.items():
            item[name] = int(values[i])
        return item


def collate_skip_none(batch: list) -> dict | None:
    """``default_collate`` after dropping ``None`` items; None when every item was None."""
    items = [b for b in batch if b is not None]
    return default_collate(items) if items else None


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised float32 ``[B, 3, H, W]`` (channels_last) on
    ``device``: the uint8 batch crosses to the device (4x fewer bytes than float32) and is
    normalised there."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # NHWC memory = channels_last
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255.0
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


class ViewStream:
    """Ray-free stand-in for a Ray Data shard (plain loops, benchmarks, tests).

    Streams Parquet view tables file by file (the file order shuffled each epoch), decodes
    them with :class:`DecodeViews` in this process and yields torch batches through a local
    shuffle buffer, with the ``iter_torch_batches`` keywords a Ray Data shard takes. Memory is
    bounded by one decode batch plus the shuffle buffer, whatever the table's size.

    Args:
        files: Parquet files (local or s3://).
        decode: The decode function.
        columns: Columns to read.
        decode_batch: Rows per decode call.
        seed: Seed of the file order and the shuffle buffer.
    """

    def __init__(
        self,
        files: Sequence[str],
        decode: DecodeViews,
        columns: Sequence[str],
        decode_batch: int = 256,
        seed: int = 0,
    ):
        self.files, self.decode, self.columns = list(files), decode, list(columns)
        self.decode_batch, self.seed, self.epoch = int(decode_batch), int(seed), 0

    def _decoded(self, rng: np.random.Generator):
        import pyarrow.parquet as pq

        from ktray import storage

        for i in rng.permutation(len(self.files)):
            fs, path = storage.fs_and_path(self.files[i])
            with fs.open(path, "rb") as f:
                for rb in pq.ParquetFile(f).iter_batches(self.decode_batch, columns=self.columns):
                    out = self.decode(pa.Table.from_batches([rb]))
                    if len(next(iter(out.values()))):
                        yield {k: torch.from_numpy(v) for k, v in out.items()}

    def iter_torch_batches(
        self,
        *,
        batch_size: int,
        local_shuffle_buffer_size: int | None = None,
        drop_last: bool = False,
        **_ignored,
    ):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        buf: dict[str, torch.Tensor] | None = None
        cap = max(int(local_shuffle_buffer_size or 0), batch_size)
        for part in self._decoded(rng):
            buf = part if buf is None else {k: torch.cat([buf[k], part[k]]) for k in buf}
            if local_shuffle_buffer_size:
                perm = torch.from_numpy(rng.permutation(len(buf["x"])))
                buf = {k: v[perm] for k, v in buf.items()}
            while len(buf["x"]) >= cap:
                yield {k: v[:batch_size] for k, v in buf.items()}
                buf = {k: v[batch_size:] for k, v in buf.items()}
        while buf is not None and len(buf["x"]) >= (batch_size if drop_last else 1):
            yield {k: v[:batch_size] for k, v in buf.items()}
            buf = {k: v[batch_size:] for k, v in buf.items()}
