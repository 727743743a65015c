"""``ktray finetune``: train the student on the labeled images (Ray Train).

With ``init`` naming a distilled student (``task@in_domain``, ...) it finetunes that student at
``finetune.lr``; with no init it is the from-scratch baseline at ``finetune.scratch_lr``.
"""

from __future__ import annotations

from ktray.config import Config
from ktray.stages import distill as distill_stage
from ktray.stages.train_stage import common_spec, run_train_stage
from ktray.pipeline.validate import parse_method


def run(cfg: Config, init: str = "") -> dict:
    """Finetune; ``init`` is a method name (``OBJECTIVE@TRANSFER``) or '' for scratch."""
    f = cfg.finetune
    init_dir, init_hash = "", ""
    if init and init != "scratch":
        objective, transfer = parse_method(init)
        pre = distill_stage.run(cfg, transfer, objective)
        init_dir, init_hash = pre["outputs"]["model"], pre["config_hash"]
    scratch = not init_dir
    spec = dict(common_spec(cfg, 0, ""), kind="finetune", init_dir=init_dir,
                steps=f.scratch_steps if scratch else f.steps,
                lr=f.scratch_lr if scratch else f.lr, weight_decay=f.weight_decay,
                warmup_steps=f.warmup_steps, batch_size=f.batch_size, report_every=50)
    return run_train_stage(cfg, "finetune", init or "scratch", spec, (f, cfg.student, init, init_hash))
