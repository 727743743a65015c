"""``ktray evaluate``: test metrics of any saved checkpoint on the task's test split."""

from __future__ import annotations

import logging

from ktray import storage
from ktray.config import Config
from ktray.errors import KtrayError
from ktray.evaluation import evaluate_model_dir
from ktray.pipeline.tasks import prepare_task

log = logging.getLogger("ktray")


def run(cfg: Config, checkpoint: str, split: str = "test") -> dict:
    """Evaluate ``checkpoint`` (a model folder, local or s3://) on ``split``."""
    if not storage.exists(storage.join(checkpoint, "model.json")):
        raise KtrayError(f"not a ktray checkpoint (no model.json): {checkpoint}")
    info = prepare_task(cfg)
    if split not in info["outputs"]:
        raise KtrayError(f"the task has no '{split}' split")
    result = evaluate_model_dir(checkpoint, info["outputs"][split], cfg.eval_batch_size,
                                num_classes=info["num_classes"])
    result["split"] = split
    result["class_names"] = info["class_names"]
    return result
