"""Teacher predictions over image tables (no ray here).

``expand_views`` turns an image table into one row per (image, view) with the view's crop box;
:class:`Predictor` loads a saved teacher and maps such rows to logits and pooled features. The
``logits`` stage runs a Predictor inside Ray Data actors; benchmarks run it in a plain loop.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ktray.data import columns as C
from ktray.data.sources import load_images
from ktray.data.views import apply_view, sample_view, view_from_row
from ktray.models import load_model

VIEW_COLUMNS = [C.IMAGE_ID, C.SOURCE, C.VIEW, *C.BOX, C.FLIP]


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
            for k, val in zip(VIEW_COLUMNS, (image_id, source, v, p.x0, p.y0, p.x1, p.y1,
                                             p.flip)):
                cols[k].append(val)
    return pa.table({
        C.IMAGE_ID: pa.array(cols[C.IMAGE_ID], pa.string()),
        C.SOURCE: pa.array(cols[C.SOURCE], pa.string()),
        C.VIEW: pa.array(cols[C.VIEW], pa.int32()),
        **{k: pa.array(cols[k], pa.float32()) for k in C.BOX},
        C.FLIP: pa.array(cols[C.FLIP], pa.bool_()),
    })


def output_schema(num_classes: int, feature_dim: int) -> pa.Schema:
    return pa.schema([
        (C.IMAGE_ID, pa.string()), (C.SOURCE, pa.string()), (C.VIEW, pa.int32()),
        *[(k, pa.float32()) for k in C.BOX], (C.FLIP, pa.bool_()),
        (C.LOGITS, pa.list_(pa.float32(), num_classes)),
        (C.FEATURES, pa.list_(pa.float32(), feature_dim)),
    ])


class Predictor:
    """A saved teacher applied to view rows, in mini-batches.

    Args:
        model_dir: a checkpoint folder written by ``save_model`` (local or s3://).
        batch_size: images per forward pass.
        device: ``cuda``/``cpu``; default: cuda when available.
        amp: run under bf16 autocast on GPU.
    """

    def __init__(self, model_dir: str, batch_size: int = 128, device: str | None = None,
                 amp: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.spec = load_model(model_dir)
        # channels_last: ~1.5x faster convolutions on CPU (oneDNN) and tensor cores on GPU
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.amp = amp and self.device.type == "cuda"
        self.num_classes = self.spec["num_classes"]
        self.feature_dim = int(self.model.backbone.feature_dim)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``x [B,3,H,W]`` -> logits ``[B,C]`` and features ``[B,D]`` as float32 numpy."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            logits, feats = self.model.forward_all(x)
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()

    def predict(self, rows: pa.Table) -> tuple[pa.Table, int]:
        """Rows with view columns -> (rows + logits + features, number of unreadable images)."""
        size, mean, std = self.spec["img_size"], self.spec["mean"], self.spec["std"]
        pylist = rows.select(VIEW_COLUMNS).to_pylist()
        keep, logits, feats = [], [], []
        for start in range(0, len(pylist), self.batch_size):
            chunk = pylist[start:start + self.batch_size]
            images = load_images([r[C.SOURCE] for r in chunk])
            xs = []
            for i, (r, img) in enumerate(zip(chunk, images)):
                if img is not None:
                    xs.append(apply_view(img, view_from_row(r), size, mean, std))
                    keep.append(start + i)
            if xs:
                lo, fe = self.forward(torch.stack(xs))
                logits.append(lo)
                feats.append(fe)
        skipped = len(pylist) - len(keep)
        out = rows.select(VIEW_COLUMNS).take(pa.array(keep, pa.int64()))
        lo = np.concatenate(logits) if logits else np.zeros((0, self.num_classes), np.float32)
        fe = np.concatenate(feats) if feats else np.zeros((0, self.feature_dim), np.float32)
        out = out.append_column(C.LOGITS, _fixed_list(lo)).append_column(
            C.FEATURES, _fixed_list(fe))
        return out.cast(output_schema(self.num_classes, self.feature_dim)), skipped


def _fixed_list(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
