"""``ktray distill``: pretrain the student on a transfer set with Ray Train (DDP).

``objective=task`` matches the adapted teacher's predictions (KL, temperature);
``objective=features`` is the task-agnostic baseline (teacher features through a projection).
Teacher targets come precomputed from the ``logits`` stage (same stored views), from any
table following the logits contract (``distill.targets=URI``), or from the teacher run online
on the same view (no logits pass then). The rows stream to the workers through Ray Data
(:mod:`ktray.stages.train_data`).
"""

from __future__ import annotations

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.errors import KtrayError
from ktray.models import read_spec
from ktray.pipeline import replicates
from ktray.pipeline.tasks import prepare_task, read_transfer, transfer_identity
from ktray.predict import expand_views, order_for_reading
from ktray.stages import logits as logits_stage
from ktray.stages import teacher as teacher_stage
from ktray.stages.common import trainer_cpus
from ktray.stages.train_data import describe_targets, view_dataset
from ktray.stages.train_stage import run_train_stage
from ktray.train.specs import DistillSpec


def run(
    cfg: Config, transfer: str = "in_domain", objective: str | None = None, name: str = ""
) -> dict:
    """Distill into a student (random init, or the ``student.*`` starting weights an
    ``...+init@WEIGHTS`` method sets); manifest outputs: ``model``. ``name``: the output's
    name (default ``OBJECTIVE@TRANSFER``)."""
    spec = DistillSpec.from_config(cfg, objective)
    teacher = teacher_stage.run(cfg) if spec.online or not cfg.distill.targets else None
    sizes = {"x": spec.student_img_size}
    inputs: dict = {}
    info = None  # what describe_targets says of a Parquet view table (not online)
    if spec.online:
        # the teacher runs on every view during training: no logits pass
        teacher_dir = teacher["outputs"]["model"]
        sizes["xt"] = int(read_spec(teacher_dir)["img_size"])
        # fresh views (augment=consistent): one row per image, its view drawn at each step
        views = 1 if spec.augment == "consistent" else cfg.logits.views
        # in the logits stage's order: container files read sequentially, image files of
        # their own not class by class
        rows = expand_views(
            order_for_reading(read_transfer(cfg, transfer)),
            views,
            cfg.data.seed,
            cfg.logits.scale_min,
        )
        columns = [C.SOURCE, *C.BOX, C.FLIP]
        source, n = rows, rows.num_rows
        inputs["teacher_dir"] = teacher_dir
        hash_inputs = {
            "teacher": teacher["config_hash"],
            "transfer": transfer,
            "files": transfer_identity(cfg, transfer),  # images replaced under the same path
            "views": config_hash(
                views,
                cfg.logits.scale_min,
                cfg.data.seed,
                rows.column(C.IMAGE_ID).to_pylist(),
                rows.column(C.SOURCE).to_pylist(),
            ),
        }
    else:
        if cfg.distill.targets:
            uri = cfg.distill.targets
            hash_inputs = {"targets": uri, "files": storage.fingerprint(uri)}
        else:
            logits = logits_stage.run(
                cfg, transfer, features=True if spec.objective == "features" else None
            )
            uri = logits["outputs"]["parts"]
            hash_inputs = {"logits": logits["config_hash"]}
        info = describe_targets(uri, spec.target_column)
        if spec.target_column == C.LOGITS and not spec.dense_size:
            classes = prepare_task(cfg)["num_classes"]
            if info["target_width"] != classes:
                raise KtrayError(
                    f"targets table {uri}: {info['target_width']} logits per row, but the task "
                    f"has {classes} classes"
                )
        source, columns, n = uri, info["columns"], info["rows"]
        inputs["feature_dim"] = info["feature_dim"]
    inputs["rows"] = n
    # what one decoded row carries besides pixels (sizes the cache-or-stream choice)
    target_dim = (
        0 if spec.online else (inputs.get("feature_dim") or prepare_task(cfg)["num_classes"])
    )
    if spec.dense_size and not spec.online and not inputs.get("feature_dim"):
        target_dim *= spec.dense_size**2  # segmentation: C x s x s per row
    # pretraining compute = this stage's FLOPs (+ the logits pass's only when it read one)
    extra = {
        "uses_logits": not spec.online and not cfg.distill.targets,
        "transfer_rows": n,
        "teacher_mode": spec.teacher_mode,
    }
    # a student trained with train.seed=N>0 (a replicate of seeds=N) gets its own output
    name = replicates.stage_name(name or f"{spec.objective}@{transfer}", cfg.train.seed)
    # A features-distilled student has an untrained head: its test accuracy means nothing.
    return run_train_stage(
        cfg,
        "distill",
        name,
        spec,
        inputs,
        hash_inputs,
        evaluate=spec.objective == "task",
        extra=extra,
        datasets=lambda: {
            "train": view_dataset(
                source,
                columns,
                sizes,
                spec,
                seed=spec.seed,
                rows=n,
                target_dim=target_dim,
                trainer_cpus=trainer_cpus(cfg),
                described=info,
                steps=spec.steps,
            )
        },
    )
