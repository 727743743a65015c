"""``ktray teacher``: adapt the VFM to the task (backbone + task head) with Ray Train."""

from __future__ import annotations

from ktray import io
from ktray.config import Config, config_hash
from ktray.errors import KtrayError
from ktray.models import read_spec
from ktray.stages.train_stage import run_train_stage
from ktray.tasks import prepare_task


def run(cfg: Config) -> dict:
    """Train (or reuse) the adapted teacher; manifest outputs: ``model`` (checkpoint dir)."""
    t = cfg.teacher
    if t.checkpoint and io.exists(io.join(t.checkpoint, "model.json")):
        return _adopt(cfg)
    spec = {"kind": "teacher", "backbone": t.backbone, "checkpoint": t.checkpoint,
            "pretrained": t.pretrained, "img_size": t.img_size, "mode": t.mode,
            "partial_blocks": t.partial_blocks, "probe_views": t.probe_views, "steps": _steps(cfg), "lr": t.lr,
            "weight_decay": t.weight_decay, "warmup_steps": max(1, t.epochs // 20),
            "batch_size": t.batch_size, "seed": cfg.data.seed, "report_every": 50}
    return run_train_stage(cfg, "teacher", "", spec, (t,))


def _steps(cfg: Config) -> int:
    """teacher.epochs passes over the labeled images, in optimizer steps."""
    info = prepare_task(cfg)
    n = info["rows"]["train"]
    return max(1, cfg.teacher.epochs * -(-n // cfg.teacher.batch_size))


def _adopt(cfg: Config) -> dict:
    """Use a finished ktray teacher checkpoint instead of training one."""
    info = prepare_task(cfg)
    spec = read_spec(cfg.teacher.checkpoint)
    if spec.get("num_classes") != info["num_classes"]:
        raise KtrayError(f"teacher checkpoint {cfg.teacher.checkpoint} has a head of "
                         f"{spec.get('num_classes')} classes but the task has "
                         f"{info['num_classes']}")
    return {"stage": "teacher", "name": "", "outputs": {"model": cfg.teacher.checkpoint},
            "config_hash": config_hash(cfg.teacher.checkpoint), "adopted": True}
