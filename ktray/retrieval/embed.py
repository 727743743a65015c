"""Crop embeddings for retrieval (no ray here).

:class:`Embedder` loads the retrieval encoder (a backbone made by ``create_backbone``: the
configured ``curate.encoder``, or the teacher's pretrained backbone) and maps image rows
``(gallery_index, image_id, source)`` to L2-normalised embeddings of each image's crops
(:class:`CropScheme`: the full image first, then the crops of :func:`crop_boxes`). Each image
is decoded once for all its crops (:func:`decode_crops`, to ``uint8`` arrays); unreadable images
are skipped and counted. The curate stage decodes in a CPU stage and runs an Embedder inside
Ray Data actors (normalising on the device); the benchmark runs it in a plain loop.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch

from ktray.data import columns as C
from ktray.retrieval.crops import (  # noqa: F401  (torch-free, for decode workers; re-exported)
    GALLERY_INDEX,
    INPUT_COLUMNS,
    OUTPUT_COLUMNS,
    CropScheme,
    decode_crops,
)
from ktray.retrieval.index import l2_normalize


@dataclass(frozen=True)
class EncoderSpec:
    """How to build the retrieval encoder with ``create_backbone``."""

    name: str
    pretrained: bool = True
    checkpoint: str = ""
    img_size: int = 64
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def encoder_from_config(cfg) -> EncoderSpec:
    """``curate.encoder`` (pretrained per ``curate.pretrained``), or when empty the teacher's
    backbone with the teacher's weights settings (not the adapted teacher: no head)."""
    cur = cfg.curate
    if cur.encoder:
        return EncoderSpec(cur.encoder, bool(cur.pretrained), "", int(cur.img_size))
    t = cfg.teacher
    # teacher.checkpoint may be a backbone state dict (used) or a finished ktray teacher
    # folder (the adapted teacher, adopted by the teacher stage: not a backbone state dict)
    ckpt = t.checkpoint if t.checkpoint and os.path.isfile(t.checkpoint) else ""
    return EncoderSpec(t.backbone, bool(t.pretrained), ckpt, int(cur.img_size))


EMBEDDING_DTYPE = "float16"
"""Stored embedding values: float16 halves the bytes (75M x 1024 crops: 154 GB, not 307 GB);
the unit vectors lose ~1e-3 of cosine, far below any threshold used on them."""


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            (GALLERY_INDEX, pa.int64()),
            (C.IMAGE_ID, pa.string()),
            (C.CROP_ID, pa.string()),
            *[(k, pa.float32()) for k in C.BOX],
            (C.EMBEDDING, pa.list_(pa.float16(), dim)),
        ]
    )


def encoder_facts(spec: EncoderSpec) -> tuple[float, int]:
    """``(forward FLOPs on one crop, embedding size)`` of the encoder (built with random
    weights: no download)."""
    from ktray.models import count_flops, create_backbone

    backbone = create_backbone(spec.name, pretrained=False, img_size=spec.img_size)
    return count_flops(backbone, spec.img_size), int(backbone.feature_dim)


def flops_per_crop(spec: EncoderSpec) -> float:
    """Forward FLOPs of the encoder on one crop (built with random weights: no download)."""
    return encoder_facts(spec)[0]


class Embedder:
    """The retrieval encoder applied to image rows, in mini-batches of crops.

    Args:
        spec: the encoder (name, weights, input size).
        batch_size: crops per forward pass.
        device: ``cuda``/``cpu``; default: cuda when available.
        amp: on GPU, the model in bf16 (a no-op on CPU).
    """

    def __init__(
        self, spec: EncoderSpec, batch_size: int = 128, device: str | None = None, amp: bool = True
    ):
        from ktray.models import create_backbone

        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Random weights (pretrained=False, no checkpoint) are seeded: every actor and every
        # run must embed with the same encoder.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone = create_backbone(
                spec.name,
                pretrained=spec.pretrained,
                checkpoint=spec.checkpoint or None,
                img_size=spec.img_size,
            )
        self.mean, self.std = backbone.mean, backbone.std
        self.dim = int(backbone.feature_dim)
        # bf16 weights on GPU (a no-op on CPU); channels_last: faster convolutions on CPU
        # (oneDNN) and tensor cores on GPU
        self.dtype = torch.bfloat16 if amp and self.device.type == "cuda" else torch.float32
        self.model = backbone.eval().to(
            self.device, dtype=self.dtype, memory_format=torch.channels_last
        )
        self.batch_size = max(1, int(batch_size))

    @torch.inference_mode()
    def embed_tensors(self, x: torch.Tensor) -> np.ndarray:
        """``x [B, 3, H, W]`` normalised crops -> ``[B, D]`` unit float32 embeddings."""
        x = x.to(self.device, self.dtype, non_blocking=True).contiguous(
            memory_format=torch.channels_last
        )
        return l2_normalize(self.model(x).float().cpu().numpy())

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8 [N, S, S, 3]`` crops -> ``[N, D]`` unit float32 embeddings (normalised on
        the device, in batches of ``batch_size``)."""
        from ktray.predict import normalize_on_device

        out = [
            self.embed_tensors(
                normalize_on_device(
                    pixels[i : i + self.batch_size], self.mean, self.std, self.device, self.dtype
                )
            )
            for i in range(0, len(pixels), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def table(self, cols: dict, pixels: np.ndarray, ok: np.ndarray) -> tuple[pa.Table, int]:
        """Decoded crops (:func:`decode_crops`) -> (embeddings table of the readable images'
        crops, unreadable images)."""
        keep = np.flatnonzero(ok)
        emb = self.embed_pixels(pixels[keep])
        kept = {k: [cols[k][i] for i in keep] for k in OUTPUT_COLUMNS}
        return _table(kept, emb, self.dim), len(ok) - len(keep)

    def embed_rows(self, rows: pa.Table, scheme: CropScheme) -> tuple[pa.Table, int]:
        """Embed every crop of every readable image, decoding in this process (plain loop).

        Args:
            rows: ``gallery_index, image_id, source`` (other columns ignored).
            scheme: the crops of each image.

        Returns:
            ``(table, skipped)``: one row per crop (:func:`embedding_schema`), images in input
            order and crops in box order; ``skipped`` counts unreadable images.
        """
        tables, skipped = [], 0
        step = max(1, 1024 // scheme.crops_per_image())
        for start in range(0, len(rows), step):
            cols, pixels, ok = decode_crops(rows.slice(start, step), scheme, self.spec.img_size)
            table, n = self.table(cols, pixels, ok)
            tables.append(table)
            skipped += n
        if not tables:
            return embedding_schema(self.dim).empty_table(), 0
        return pa.concat_tables(tables), skipped


def _table(cols: dict[str, list], emb: np.ndarray, dim: int) -> pa.Table:
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    arrays = [
        pa.array(cols[GALLERY_INDEX], pa.int64()),
        pa.array(cols[C.IMAGE_ID], pa.string()),
        pa.array(cols[C.CROP_ID], pa.string()),
        *[pa.array(cols[k], pa.float32()) for k in C.BOX],
        pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
    ]
    return pa.Table.from_arrays(arrays, schema=embedding_schema(dim))


def vectors(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of an embeddings table as a ``[N, D]`` float32 array."""
    col = table[C.EMBEDDING].combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    else:
        dim = len(col[0]) if len(col) else 0
    flat = pa.compute.list_flatten(col).to_numpy(zero_copy_only=False)
    return np.asarray(flat, np.float32).reshape(len(col), dim)
