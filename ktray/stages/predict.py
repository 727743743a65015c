"""``ktray predict MODEL_DIR --input URI out=OUT``: batch inference with Ray Data.

``MODEL_DIR`` is a checkpoint folder (PyTorch; the GPU when the actor has one) or an export
folder from ``ktray export`` (``model.onnx`` with onnxruntime on CPU). ``URI`` is a folder of
images, Parquet shards of encoded bytes or webdataset ``.tar`` shards, local or ``s3://``. The
images are cut into shards of ``shard_rows`` and go through the inference passes' two stages
(:func:`ktray.stages.shards.map_shards`): CPU tasks decode each shard to ``uint8`` pixels at
the model's size (``infer.decode_cpus``, ``infer.decode_concurrency``), and a pool of
:class:`PredictWriter` actors (``infer.actors``, default one per GPU; ``infer.cpus_per_actor``,
``infer.gpus_per_actor``, ``infer.calls_per_actor``) normalises them on the device, predicts
and writes ``OUT/predictions/part-NNNNN.parquet`` atomically (``image_id, source, pred,
prob, probs``; unreadable images are skipped and counted). A model actor never decodes: on a
GPU it would wait for the CPU between batches. A segmentation model (``seg_*``
checkpoint or its export) writes ``image_id, source, mask, width, height, classes`` instead:
``mask`` is PNG bytes of the class index per pixel at the image's own size (logits resized
bilinearly, then argmax: :func:`ktray.seg_masks.logits_to_mask`), ``classes`` the ids present.
A rerun computes only the shards whose part file is missing; ``manifest.json`` (with
``task_type``) is written last.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from ktray import export, storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.data.readers import read_gallery
from ktray.errors import KtrayError
from ktray.pipeline import manifest
from ktray.stages import decode_tasks, shards
from ktray.stages.decode_tasks import HEIGHT, WIDTH

log = logging.getLogger("ktray")
SHARD_ROWS = 1024
PREDICTIONS = "predictions"
PRED, PROB, PROBS = "pred", "prob", "probs"
MASK, CLASSES = "mask", "classes"


def schema(num_classes: int) -> pa.Schema:
    return pa.schema(
        [
            (C.IMAGE_ID, pa.string()),
            (C.SOURCE, pa.string()),
            (PRED, pa.int32()),
            (PROB, pa.float32()),
            (PROBS, pa.list_(pa.float32(), num_classes)),
        ]
    )


def is_segmentation(spec: dict) -> bool:
    """Whether a checkpoint / export spec is a segmentation model (``seg_*`` kind)."""
    return str(spec.get("kind", "")).startswith("seg_")


def seg_schema() -> pa.Schema:
    return pa.schema(
        [
            (C.IMAGE_ID, pa.string()),
            (C.SOURCE, pa.string()),
            (MASK, pa.binary()),
            (WIDTH, pa.int32()),
            (HEIGHT, pa.int32()),
            (CLASSES, pa.list_(pa.int32())),
        ]
    )


class Classifier:
    """A checkpoint (PyTorch) or export folder (onnxruntime) mapping decoded images to classes.

    Args:
        model_dir: A folder with ``model.onnx`` + ``model.json`` (export) or a checkpoint.
        batch_size: Images per forward pass.
    """

    def __init__(self, model_dir: str, batch_size: int = 128):
        import torch

        from ktray.models import load_model, read_spec
        from ktray.predict import normalize_on_device

        self.batch_size = batch_size
        onnx_uri = storage.join(model_dir, export.ONNX_FILE)
        self.spec = read_spec(model_dir)
        mean, std = self.spec["mean"], self.spec["std"]
        if storage.exists(onnx_uri):
            local = storage.download_dir(model_dir, tempfile.mkdtemp(prefix="ktray-onnx-"))
            session = export.onnx_session(os.path.join(local, export.ONNX_FILE))
            self.backend = "onnx"
            self.logits = lambda pixels: export.onnx_logits(session, _normalized(pixels, mean, std))
            return
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(model_dir)[0].to(device)

        @torch.inference_mode()
        def logits(pixels: np.ndarray) -> np.ndarray:
            x = normalize_on_device(pixels, mean, std, device, torch.float32)
            if device.type != "cuda":  # NCHW on CPU: the numbers of eval_transform's tensors
                x = x.contiguous()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return model(x).float().cpu().numpy()

        self.backend, self.logits = f"pytorch-{device.type}", logits

    def predict(
        self, image_ids: np.ndarray, sources: np.ndarray, pixels: np.ndarray, sizes: np.ndarray
    ) -> pa.Table:
        """Readable images (``uint8 [N, S, S, 3]`` at the model's size, each image's own
        ``(width, height)`` in ``sizes``) -> their prediction rows."""
        parts = []
        for start in range(0, len(pixels), self.batch_size):
            rows = slice(start, start + self.batch_size)
            parts.append(
                pa.table(
                    {
                        C.IMAGE_ID: pa.array(image_ids[rows].tolist(), pa.string()),
                        C.SOURCE: pa.array(sources[rows].tolist(), pa.string()),
                    }
                    | self._columns(self.logits(pixels[rows]), sizes[rows].tolist())
                )
            )
        out_schema = self.schema()
        return pa.concat_tables(parts).cast(out_schema) if parts else out_schema.empty_table()

    def schema(self) -> pa.Schema:
        return schema(self.spec["num_classes"])

    def _columns(self, z: np.ndarray, sizes: list[tuple[int, int]]) -> dict:
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return {
            PRED: pa.array(p.argmax(1), pa.int32()),
            PROB: pa.array(p.max(1), pa.float32()),
            PROBS: pa.FixedSizeListArray.from_arrays(
                pa.array(p.astype(np.float32).ravel()), p.shape[1]
            ),
        }


class Segmenter(Classifier):
    """A ``seg_*`` checkpoint or its export folder mapping image rows to masks: the logits
    (the model's grid, or S x S from ``model.onnx``) resized bilinearly to each image's own
    size, then the argmax (:func:`ktray.seg_masks.logits_to_mask`, what ktray evaluates and
    the MLflow segmenter serves), stored as PNG bytes."""

    def schema(self) -> pa.Schema:
        return seg_schema()

    def _columns(self, z: np.ndarray, sizes: list[tuple[int, int]]) -> dict:
        from ktray.seg_masks import logits_to_mask, mask_png

        masks = [logits_to_mask(zi, (h, w)) for zi, (w, h) in zip(z, sizes)]
        return {
            MASK: pa.array([mask_png(m) for m in masks], pa.binary()),
            WIDTH: pa.array([w for w, _ in sizes], pa.int32()),
            HEIGHT: pa.array([h for _, h in sizes], pa.int32()),
            CLASSES: pa.array([np.unique(m).tolist() for m in masks], pa.list_(pa.int32())),
        }


def _normalized(pixels: np.ndarray, mean, std) -> np.ndarray:
    """``uint8 [N, S, S, 3]`` -> normalised float32 ``[N, 3, S, S]`` (onnxruntime's input), the
    arithmetic of :func:`ktray.data.views.to_tensor`."""
    from ktray.data.views import normalized_array

    return normalized_array(pixels.transpose(0, 3, 1, 2), mean, std)


class PredictWriter(shards.ShardWriter):
    """Ray Data model actor: whole decoded shards -> predictions, each shard's part file
    written atomically."""

    def __init__(self, out_dirs: dict, model_dir: str, batch_size: int, threads: int = 0):
        super().__init__(out_dirs, threads)
        from ktray.models import read_spec

        cls = Segmenter if is_segmentation(read_spec(model_dir)) else Classifier
        self.classifier = cls(model_dir, batch_size)
        self.ready()

    def process(self, part: dict) -> tuple[pa.Table, int]:
        ok = part[shards.OK]
        keep = slice(None) if ok.all() else np.flatnonzero(ok)  # all readable: no copy
        sizes = np.stack([part[WIDTH][keep], part[HEIGHT][keep]], axis=1)
        table = self.classifier.predict(
            part[C.IMAGE_ID][keep], part[C.SOURCE][keep], part[shards.PIXELS][keep], sizes
        )
        return table, len(ok) - len(table)


def predictions_dir(cfg: Config) -> str:
    return storage.join(cfg.out, PREDICTIONS)


def run(
    cfg: Config, model_dir: str, input_uri: str, shard_rows: int = SHARD_ROWS, batch_size: int = 128
) -> dict:
    """Predict every image of ``input_uri`` with ``model_dir``; see the module docstring."""
    from ktray.models import read_spec

    if not cfg.out:
        raise KtrayError("ktray predict needs out=DIR")
    spec = read_spec(model_dir)
    out = predictions_dir(cfg)
    # the model's and the input's files too: a model retrained or images replaced under the
    # same path are predicted afresh
    files = [storage.fingerprint(model_dir), storage.fingerprint(input_uri)]
    h = config_hash(model_dir, input_uri, shard_rows, spec, files)
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("predict: reusing the finished run in %s", out)
        return done
    started = time.perf_counter()
    table = read_gallery(input_uri).select([C.IMAGE_ID, C.SOURCE])
    n_shards = max(1, math.ceil(len(table) / shard_rows))
    done_uri = storage.join(out, manifest.MANIFEST)
    if storage.exists(done_uri):  # finished under other settings: not finished any more
        fs, path = storage.fs_and_path(done_uri)
        fs.rm(path)
    # parts of a killed run of this very run are kept, any others dropped
    pending = shards.prepare(out, {"config_hash": h}, n_shards)
    log.info("predict: %d images, %d/%d shards to compute", len(table), len(pending), n_shards)
    stats: list[dict] = []
    if pending:
        size = int(spec["img_size"])
        stats = shards.map_shards(
            cfg,
            [shards.shard_block(table, PREDICTIONS, s, shard_rows) for s in pending],
            decode_tasks.full_images,
            {"size": size},
            PredictWriter,
            {"out_dirs": {PREDICTIONS: out}, "model_dir": model_dir, "batch_size": batch_size},
            shard_rows * size * size * 3,
            lambda row: (
                f"predict: shard {row['shard']} done ({row['rows']} rows, "
                f"{row['skipped']} skipped, {row['seconds']:.1f}s)"
            ),
        )
    rows = len(storage.read_parquet(out, columns=[C.IMAGE_ID]))
    elapsed = time.perf_counter() - started
    computed = sum(s["rows"] for s in stats)
    return manifest.write(
        out,
        {
            "stage": "predict",
            "name": "predictions",
            "config_hash": h,
            "outputs": {"parts": out},
            "model": model_dir,
            "input": input_uri,
            "task_type": "segmentation" if is_segmentation(spec) else "classification",
            **({"class_names": spec["class_names"]} if spec.get("class_names") else {}),
            "images": len(table),
            "rows": rows,
            "skipped": len(table) - rows,
            "shards": n_shards,
            "computed_shards": len(pending),
            "seconds": elapsed,
            "images_per_second": computed / elapsed if stats else None,
            "flops": None,
            "device_seconds": sum(s["seconds"] for s in stats),
        },
        cfg,
    )
