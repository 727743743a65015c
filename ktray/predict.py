"""Teacher predictions over image tables (no ray here).

``expand_views`` turns an image table into one row per (image, view) with the view's crop box;
``decode_views`` (in the torch-free :mod:`ktray.data.decode`) decodes such rows to ``uint8``
views; :class:`Predictor` loads a saved teacher
and maps views to float16 logits (and pooled features when asked). The ``logits`` stage decodes
in a CPU stage and runs a Predictor inside Ray Data actors; benchmarks run it in a plain loop.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pyarrow as pa
import torch

from ktray.data import columns as C
from ktray.data.decode import VIEW_COLUMNS, decode_views  # torch-free (decode workers)
from ktray.data.views import sample_view
from ktray.models import load_model


def expand_views(table: pa.Table, views: int, seed: int, scale_min: float = 0.35) -> pa.Table:
    """One row per (image, view); view 0 is the full image, later views random crops.

    Returns:
        ``image_id, source, view, x0, y0, x1, y1, flip`` rows in image-major order.
    """
    ids = table[C.IMAGE_ID].to_pylist()
    sources = table[C.SOURCE].to_pylist()
    cols: dict[str, list] = {k: [] for k in VIEW_COLUMNS}
    for image_id, source in zip(ids, sources):
        for v in range(views):
            p = sample_view(seed, image_id, v, scale=(scale_min, 1.0), first_view_full=True)
            for k, val in zip(VIEW_COLUMNS, (image_id, source, v, p.x0, p.y0, p.x1, p.y1, p.flip)):
                cols[k].append(val)
    return pa.table(
        {
            C.IMAGE_ID: pa.array(cols[C.IMAGE_ID], pa.string()),
            C.SOURCE: pa.array(cols[C.SOURCE], pa.string()),
            C.VIEW: pa.array(cols[C.VIEW], pa.int32()),
            **{k: pa.array(cols[k], pa.float32()) for k in C.BOX},
            C.FLIP: pa.array(cols[C.FLIP], pa.bool_()),
        }
    )


def output_schema(num_classes: int, feature_dim: int = 0) -> pa.Schema:
    """The logits table (ARCHITECTURE.md): ``logits`` as float16, ``features`` (float16) only
    when ``feature_dim`` > 0."""
    fields = [
        (C.IMAGE_ID, pa.string()),
        (C.SOURCE, pa.string()),
        (C.VIEW, pa.int32()),
        *[(k, pa.float32()) for k in C.BOX],
        (C.FLIP, pa.bool_()),
        (C.LOGITS, pa.list_(pa.float16(), num_classes)),
    ]
    if feature_dim:
        fields.append((C.FEATURES, pa.list_(pa.float16(), feature_dim)))
    return pa.schema(fields)


def order_for_reading(table: pa.Table) -> pa.Table:
    """Rows in the order a pass reads them best: the rows of one container file (a Parquet,
    tar or IDX file: ``URI#ROW``, ``URI#MEMBER``) together and in row order, so that each is
    read sequentially (a curated set comes in retrieval order, which would make every read
    random access); an image that is a file of its own (no ``#``) where a hash of its name puts
    it. Such files cost the same to read in any order, and in path order an ImageFolder's
    images come class by class: the logits stage writes its rows in this order and
    distillation reads them in ranges of thousands of rows, so its batches held few classes
    (10 classes of 1,000 files: 7.9 classes a batch of 128, the largest 29% of it, against
    10.0 and 15% in hash order; 100 classes of 100: 48.8 against 72.7, what shuffled rows
    give)."""
    keys = []
    for i, source in enumerate(table[C.SOURCE].to_pylist()):
        uri, sep, frag = source.partition("#")
        if not sep:  # a file of its own: a stable pseudo-random place
            uri = hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
        keys.append((uri, int(frag) if frag.isdigit() else -1, frag, i))
    order = [k[-1] for k in sorted(keys)]
    return table.take(pa.array(order, pa.int64()))


def normalize_on_device(
    pixels: np.ndarray | torch.Tensor, mean, std, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> normalised ``[B, 3, H, W]`` on ``device`` in ``dtype``,
    channels_last (the NHWC bytes travel; the arithmetic runs on the device)."""
    with warnings.catch_warnings():  # a batch straight from Ray's object store is read-only;
        # nothing writes to x: it is pinned / copied to the device / converted first
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.as_tensor(pixels)
    if device.type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return ((x - m) / s).to(dtype).contiguous(memory_format=torch.channels_last)


def load_for_inference(model_dir: str, device: str | None = None, amp: bool = True):
    """A saved model ready for inference: ``(model, spec, device, dtype)``, the model in eval
    mode on ``device`` (default: cuda when available), in bf16 on GPU with ``amp`` (a no-op on
    CPU), channels_last (~1.5x faster convolutions on CPU (oneDNN) and tensor cores on GPU)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, spec = load_model(model_dir)
    dtype = torch.bfloat16 if amp and dev.type == "cuda" else torch.float32
    model = model.eval().to(dev, dtype=dtype, memory_format=torch.channels_last)
    return model, spec, dev, dtype


class Predictor:
    """A saved teacher applied to view rows, in mini-batches.

    Usable in a plain loop (:meth:`predict`: decode + views + forward in this process) and in
    the logits stage's actors (:meth:`predict_pixels` on views decoded by a CPU stage).

    Args:
        model_dir: a checkpoint folder written by ``save_model`` (local or s3://).
        batch_size: images per forward pass.
        device: ``cuda``/``cpu``; default: cuda when available.
        amp: on GPU, run the model in bf16 (weights and activations); a no-op on CPU.
        features: also return the pooled features.
    """

    def __init__(
        self,
        model_dir: str,
        batch_size: int = 128,
        device: str | None = None,
        amp: bool = True,
        features: bool = True,
    ):
        self.model, self.spec, self.device, self.dtype = load_for_inference(model_dir, device, amp)
        self.batch_size = batch_size
        self.features = features
        self.num_classes = self.spec["num_classes"]
        self.feature_dim = int(self.model.backbone.feature_dim) if features else 0
        self.size = int(self.spec["img_size"])

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """``x [B,3,H,W]`` (normalised) -> logits ``[B,C]`` and features ``[B,D]`` (None when
        not asked for) as float16 numpy."""
        logits, feats = self._forward(x)
        return logits.cpu().numpy(), feats.cpu().numpy() if feats is not None else None

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like :meth:`forward`, the outputs left on the device (float16): no host sync."""
        x = x.to(self.device, self.dtype, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        logits, feats = self.model.forward_all(x)
        return logits.to(torch.float16), feats.to(torch.float16) if self.features else None

    @torch.inference_mode()
    def predict_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``uint8 [N, S, S, 3]`` views -> float16 logits ``[N, C]`` (+ features ``[N, D]``).

        The outputs stay on the device until the last batch: the host prepares (pins, copies)
        batch i+1 while the GPU still runs batch i, and waits once per call, not per batch.
        """
        if len(pixels) == 0:
            empty = np.zeros((0, self.num_classes), np.float16)
            return empty, np.zeros((0, self.feature_dim), np.float16) if self.features else None
        lo, fe = [], []
        for start in range(0, len(pixels), self.batch_size):
            x = normalize_on_device(
                pixels[start : start + self.batch_size],
                self.spec["mean"],
                self.spec["std"],
                self.device,
                self.dtype,
            )
            a, b = self._forward(x)
            lo.append(a)
            fe.append(b)
        logits = torch.cat(lo).cpu().numpy()
        return logits, torch.cat(fe).cpu().numpy() if self.features else None

    def table(self, rows: pa.Table, pixels: np.ndarray, ok: np.ndarray) -> tuple[pa.Table, int]:
        """View rows + their decoded views -> (logits table of the readable rows, skipped)."""
        keep = np.flatnonzero(ok)
        # (all readable, the usual case: no copy of the shard's pixels)
        logits, feats = self.predict_pixels(pixels if len(keep) == len(ok) else pixels[keep])
        out = rows.select(VIEW_COLUMNS).take(pa.array(keep, pa.int64()))
        out = out.append_column(C.LOGITS, fixed_list(logits))
        if feats is not None:
            out = out.append_column(C.FEATURES, fixed_list(feats))
        return out.cast(output_schema(self.num_classes, self.feature_dim)), len(ok) - len(keep)

    def predict(self, rows: pa.Table) -> tuple[pa.Table, int]:
        """Rows with view columns -> (rows + logits [+ features], number of unreadable rows),
        decoding in this process (the plain loop)."""
        outs, skipped = [], 0
        step = max(self.batch_size, 1024)
        for start in range(0, len(rows), step):
            chunk = rows.slice(start, step)
            pixels, ok = decode_views(chunk, self.size)
            out, n = self.table(chunk, pixels, ok)
            outs.append(out)
            skipped += n
        if not outs:
            return output_schema(self.num_classes, self.feature_dim).empty_table(), 0
        return pa.concat_tables(outs), skipped


def fixed_list(a: np.ndarray) -> pa.Array:
    """``[N, K]`` numpy -> a fixed-size list array of its dtype (float16 stays float16)."""
    a = np.ascontiguousarray(a)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
