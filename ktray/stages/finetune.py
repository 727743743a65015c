"""``ktray finetune``: train the student on the labeled images (Ray Train).

With ``init`` naming a distilled student (``task@in_domain``, ...) it finetunes that student at
``finetune.lr``; with no init it is the from-scratch baseline at ``finetune.scratch_lr``.
The labeled sets are small (tens to thousands of images): they keep a map-style DataLoader
over images decoded in the worker, which starts at once where a Ray Data pipeline pays its
start-up every run.
"""

from __future__ import annotations

from ktray.config import Config
from ktray.pipeline.tasks import prepare_task
from ktray.pipeline.validate import parse_method
from ktray.stages import distill as distill_stage
from ktray.stages.train_stage import run_train_stage, table_fingerprint
from ktray.train.specs import FinetuneSpec


def run(cfg: Config, init: str = "") -> dict:
    """Finetune; ``init`` is a method name (``OBJECTIVE@TRANSFER``) or '' for scratch."""
    init_dir, init_hash = "", ""
    if init and init != "scratch":
        objective, transfer = parse_method(init)
        pre = distill_stage.run(cfg, transfer, objective)
        init_dir, init_hash = pre["outputs"]["model"], pre["config_hash"]
    spec = FinetuneSpec.from_config(cfg, scratch=not init_dir)
    info = prepare_task(cfg)
    train_uri, val_uri = info["outputs"]["train"], info["outputs"].get("val", "")
    inputs = {"train_uri": train_uri, "val_uri": val_uri, "init_dir": init_dir}
    hash_inputs = {
        "train": table_fingerprint(train_uri),
        "val": table_fingerprint(val_uri),
        "num_classes": info["num_classes"],
        "init": init_hash,
    }
    return run_train_stage(cfg, "finetune", init or "scratch", spec, inputs, hash_inputs)
