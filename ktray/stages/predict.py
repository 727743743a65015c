"""``ktray predict MODEL_DIR --input URI out=OUT``: batch inference with Ray Data.

``MODEL_DIR`` is a checkpoint folder (PyTorch; the GPU when the actor has one) or an export
folder from ``ktray export`` (``model.onnx`` with onnxruntime on CPU). ``URI`` is a folder of
images, Parquet shards of encoded bytes or webdataset ``.tar`` shards, local or ``s3://``. The
images are cut into shards of ``shard_rows``; a pool of :class:`PredictWriter` actors
(``infer.actors``, ``infer.cpus_per_actor``, ``infer.gpus_per_actor``) predicts each shard and
writes ``OUT/predictions/part-NNNNN.parquet`` atomically (``image_id, source, pred,
prob, probs``; unreadable images are skipped and counted). A segmentation model (``seg_*``
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
from ktray.stages.shards import map_without_restarts, part_name, rows_with_retries

log = logging.getLogger("ktray")
SHARD_ROWS = 1024
PRED, PROB, PROBS = "pred", "prob", "probs"
MASK, WIDTH, HEIGHT, CLASSES = "mask", "width", "height", "classes"


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
    """A checkpoint (PyTorch) or export folder (onnxruntime) mapping image rows to classes.

    Args:
        model_dir: A folder with ``model.onnx`` + ``model.json`` (export) or a checkpoint.
        batch_size: Images per forward pass.
    """

    def __init__(self, model_dir: str, batch_size: int = 128):
        import torch

        from ktray.models import load_model, read_spec

        self.batch_size = batch_size
        onnx_uri = storage.join(model_dir, export.ONNX_FILE)
        self.spec = read_spec(model_dir)
        if storage.exists(onnx_uri):
            local = storage.download_dir(model_dir, tempfile.mkdtemp(prefix="ktray-onnx-"))
            session = export.onnx_session(os.path.join(local, export.ONNX_FILE))
            self.backend, self.logits = "onnx", lambda x: export.onnx_logits(session, x)
            return
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(model_dir)[0].to(device)

        @torch.inference_mode()
        def logits(x: np.ndarray) -> np.ndarray:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

        self.backend, self.logits = f"pytorch-{device.type}", logits

    def predict(self, rows: pa.Table) -> tuple[pa.Table, int]:
        """``image_id, source`` rows -> (prediction rows of the readable ones, unreadable)."""
        parts = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows.slice(start, self.batch_size)
            x, keep, sizes = _inputs(chunk, self.spec)
            if not len(keep):
                continue
            kept = chunk.take(pa.array(keep, pa.int64()))
            parts.append(
                pa.table(
                    {C.IMAGE_ID: kept[C.IMAGE_ID], C.SOURCE: kept[C.SOURCE]}
                    | self._columns(self.logits(x), sizes)
                )
            )
        out_schema = self.schema()
        out = pa.concat_tables(parts).cast(out_schema) if parts else out_schema.empty_table()
        return out, len(rows) - len(out)

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


def _inputs(chunk: pa.Table, spec: dict) -> tuple[np.ndarray | None, list[int], list]:
    """Model inputs of a chunk's readable images, their row numbers and ``(width, height)``."""
    from ktray.data.sources import load_images
    from ktray.data.views import eval_transform

    images = load_images(chunk[C.SOURCE].to_pylist())
    keep = [i for i, img in enumerate(images) if img is not None]
    x = (
        np.stack(
            [
                eval_transform(images[i], spec["img_size"], spec["mean"], spec["std"]).numpy()
                for i in keep
            ]
        )
        if keep
        else None
    )
    return x, keep, [images[i].size for i in keep]


class PredictWriter:
    """Ray Data actor: predicts whole shards and writes each one's part file atomically."""

    def __init__(self, model_dir: str, out_dir: str, batch_size: int, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        from ktray.models import read_spec

        cls = Segmenter if is_segmentation(read_spec(model_dir)) else Classifier
        self.classifier = cls(model_dir, batch_size)
        self.out_dir = out_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = {"shard": [], "rows": [], "skipped": [], "seconds": []}
        for shard in sorted(set(batch["shard"].to_pylist())):
            start = time.perf_counter()
            part = batch.filter(pa.compute.equal(batch["shard"], shard))
            table, skipped = self.classifier.predict(part.select([C.IMAGE_ID, C.SOURCE]))
            storage.write_parquet(storage.join(self.out_dir, part_name(shard)), table)
            for k, v in zip(stats, (shard, len(table), skipped, time.perf_counter() - start)):
                stats[k].append(v)
        return pa.table(stats)


def predictions_dir(cfg: Config) -> str:
    return storage.join(cfg.out, "predictions")


def run(
    cfg: Config, model_dir: str, input_uri: str, shard_rows: int = SHARD_ROWS, batch_size: int = 128
) -> dict:
    """Predict every image of ``input_uri`` with ``model_dir``; see the module docstring."""
    import ray

    from ktray.models import read_spec
    from ktray.stages.common import cluster_has_gpus, ensure_ray

    if not cfg.out:
        raise KtrayError("ktray predict needs out=DIR")
    spec = read_spec(model_dir)
    out = predictions_dir(cfg)
    h = config_hash(model_dir, input_uri, shard_rows, spec)
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("predict: reusing the finished run in %s", out)
        return done
    started = time.perf_counter()
    table = read_gallery(input_uri).select([C.IMAGE_ID, C.SOURCE])
    storage.makedirs(out)
    fs, path = storage.fs_and_path(out)
    existing = (
        {os.path.basename(p) for p in fs.ls(path, detail=False)} if fs.exists(path) else set()
    )
    if storage.exists(storage.join(out, manifest.MANIFEST)):  # finished under other settings
        for name in existing:
            if name.startswith("part-"):
                fs.rm(storage.fs_and_path(storage.join(out, name))[1])
        existing = set()
    n_shards = max(1, math.ceil(len(table) / shard_rows))
    pending = [s for s in range(n_shards) if part_name(s) not in existing]
    log.info("predict: %d images, %d/%d shards to compute", len(table), len(pending), n_shards)
    stats: list[dict] = []
    if pending:
        ensure_ray(cfg.ray)
        ic = cfg.infer
        gpus = ic.gpus_per_actor if ic.gpus_per_actor >= 0 else float(cluster_has_gpus())
        blocks = []
        for s in pending:
            block = table.slice(s * shard_rows, shard_rows)
            blocks.append(block.append_column("shard", pa.array([s] * len(block), pa.int32())))

        def run(todo: list[pa.Table]):
            return map_without_restarts(
                ray.data.from_arrow(todo).map_batches,
                PredictWriter,
                batch_size=None,
                batch_format="pyarrow",
                fn_constructor_kwargs={
                    "model_dir": model_dir,
                    "out_dir": out,
                    "batch_size": batch_size,
                    "threads": max(1, int(ic.cpus_per_actor)),
                },
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, ic.actors or 1)),
                num_cpus=ic.cpus_per_actor,
                num_gpus=gpus,
            )

        for row in rows_with_retries(blocks, run, ("shard",)):
            stats.append(row)
            log.info(
                "predict: shard %d done (%d rows, %d skipped, %.1fs)",
                row["shard"],
                row["rows"],
                row["skipped"],
                row["seconds"],
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
