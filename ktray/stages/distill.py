"""``ktray distill``: pretrain the student on a transfer set with Ray Train (DDP).

``objective=task`` matches the adapted teacher's predictions (KL, temperature);
``objective=features`` is the task-agnostic baseline (teacher features through a projection).
Teacher targets come precomputed from the ``logits`` stage (same stored views) or from the
teacher run online on the same view.
"""

from __future__ import annotations

from ktray.config import Config
from ktray.stages import logits as logits_stage
from ktray.stages import teacher as teacher_stage
from ktray.stages.train_stage import common_spec, run_train_stage


def run(cfg: Config, transfer: str = "in_domain", objective: str | None = None) -> dict:
    """Distill into a fresh student; manifest outputs: ``model``."""
    d = cfg.distill
    objective = objective or d.objective
    teacher = teacher_stage.run(cfg)
    targets = logits_stage.run(cfg, transfer)
    spec = dict(common_spec(cfg, 0, ""), kind="distill", objective=objective,
                teacher_mode=d.teacher_mode, temperature=d.temperature,
                loss="kl" if objective == "task" else d.feature_loss,
                targets_uri=targets["outputs"]["parts"],
                teacher_dir=teacher["outputs"]["model"], steps=d.steps, lr=d.lr,
                weight_decay=d.weight_decay, warmup_steps=d.warmup_steps,
                batch_size=d.batch_size, report_every=1)
    name = f"{objective}@{transfer}"
    # A features-distilled student has an untrained head: its test accuracy means nothing.
    return run_train_stage(cfg, "distill", name, spec,
                           (d, cfg.student, objective, transfer, targets["config_hash"]),
                           evaluate=objective == "task")
