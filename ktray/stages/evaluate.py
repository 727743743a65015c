"""``ktray evaluate``: test metrics of any saved checkpoint on the task's test split.

:func:`evaluate` picks where the work runs: a test set of at most ``infer.eval_rows`` images is
evaluated in this process (no actor start-up); a larger one by Ray Data batch inference on the
cluster, where the data is: the test table's rows (sources and labels) are sent as blocks of
``DECODE_ROWS``, their images decoded on CPU (:mod:`ktray.stages.decode_tasks`) and run
through an autoscaling pool of model actors (``infer.*``, bf16 on GPU); each batch returns
only its confusion counts and loss sum, so the driver never holds the images.
"""

from __future__ import annotations

import logging

import numpy as np

from ktray import storage
from ktray.config import Config
from ktray.data import columns as C
from ktray.data.segmentation import is_segmentation
from ktray.errors import KtrayError
from ktray.evaluation import (
    ConfusionCounter,
    evaluate_model_dir,
    metrics_from_counts,
)
from ktray.pipeline.tasks import prepare_task
from ktray.stages import decode_tasks

log = logging.getLogger("ktray")
DECODE_ROWS = 512


def run(cfg: Config, checkpoint: str, split: str = "test") -> dict:
    """Evaluate ``checkpoint`` (a model folder, local or s3://) on ``split``."""
    if not storage.exists(storage.join(checkpoint, "model.json")):
        raise KtrayError(f"not a ktray checkpoint (no model.json): {checkpoint}")
    info = prepare_task(cfg)
    if split not in info["outputs"]:
        raise KtrayError(f"the task has no '{split}' split")
    result = evaluate(cfg, checkpoint, info["outputs"][split], info["num_classes"])
    result["split"] = split
    result["class_names"] = info["class_names"]
    return result


def evaluate(
    cfg: Config, model_dir: str, table_uri: str, num_classes: int, distributed: bool | None = None
) -> dict:
    """Metrics of ``model_dir`` on the labeled table ``table_uri``.

    Args:
        distributed: Ray Data batch inference (True) or this process (False); None = Ray Data
            when the table has more than ``infer.eval_rows`` rows.
    """
    if is_segmentation(cfg.data.kind):  # segmentation: mIoU, in process
        from ktray.seg_evaluation import evaluate_seg_model_dir

        return evaluate_seg_model_dir(
            model_dir, table_uri, cfg.eval_batch_size, num_classes, cfg.data.ignore_index
        )
    if distributed is None:
        distributed = _rows(table_uri) > cfg.infer.eval_rows
    if not distributed:
        return evaluate_model_dir(
            model_dir, table_uri, cfg.eval_batch_size, num_classes=num_classes
        )
    return evaluate_distributed(cfg, model_dir, table_uri, num_classes)


class _Counter:
    """Ray Data actor: confusion counts and loss sum of one decoded batch."""

    def __init__(self, model_dir: str, batch_size: int, threads: int = 0):
        import torch

        if threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.counter = ConfusionCounter(model_dir, batch_size)

    def __call__(self, batch: dict) -> dict:
        keep = batch["ok"]
        confusion, loss = self.counter.count(batch["pixels"][keep], batch[C.LABEL][keep])
        return {"confusion": confusion.reshape(1, -1), "loss": np.asarray([loss])}


def evaluate_distributed(cfg: Config, model_dir: str, table_uri: str, num_classes: int) -> dict:
    """Ray Data batch inference over the test table; the driver sums confusion counts."""
    import ray

    from ktray.stages.common import ensure_ray
    from ktray.stages.shards import inference

    spec = storage.read_json(storage.join(model_dir, "model.json"))
    if spec["num_classes"] != num_classes:
        raise KtrayError(
            f"model {model_dir} predicts {spec['num_classes']} classes but the "
            f"task has {num_classes}"
        )
    ensure_ray(cfg.ray)
    # The rows (sources and labels, not images) are read here and sent as blocks: a Ray Data
    # read stage would need CPUs of its own beside the decode and model actors, which hold
    # theirs for the whole pass (on 2 CPUs the reads never ran).
    rows = storage.read_parquet(table_uri, columns=[C.SOURCE, C.LABEL])
    blocks = [rows.slice(i, DECODE_ROWS) for i in range(0, max(1, len(rows)), DECODE_ROWS)]
    ds = ray.data.from_arrow(blocks)
    size = int(spec["img_size"])
    ds = inference(
        cfg,
        ds,
        decode_tasks.labeled_images,
        {"size": size},
        _Counter,
        {"model_dir": model_dir, "batch_size": cfg.eval_batch_size},
        decode_bytes=DECODE_ROWS * size * size * 3,
        batch_size=DECODE_ROWS,
        blocks=len(blocks),
    )
    confusion = np.zeros(num_classes * num_classes, np.int64)
    loss = 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        confusion += batch["confusion"].sum(axis=0).astype(np.int64)
        loss += float(batch["loss"].sum())
    result = metrics_from_counts(confusion.reshape(num_classes, num_classes), loss)
    result["model"] = model_dir
    return result


def _rows(table_uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = storage.fs_and_path(table_uri)
    if fs.isdir(path):
        return sum(
            pq.ParquetFile(f, filesystem=fs).metadata.num_rows
            for f in fs.glob(path.rstrip("/") + "/*.parquet")
        )
    return pq.ParquetFile(path, filesystem=fs).metadata.num_rows
