"""``ktray teacher``: adapt the VFM to the task (backbone + task head) with Ray Train."""

from __future__ import annotations

from ktray import storage
from ktray.pipeline import manifest
from ktray.config import Config, config_hash
from ktray.errors import KtrayError
from ktray.models import load_model, read_spec
from ktray.models.flops import count_flops
from ktray.stages.train_stage import run_train_stage
from ktray.pipeline.tasks import prepare_task


def run(cfg: Config) -> dict:
    """Train (or reuse) the adapted teacher; manifest outputs: ``model`` (checkpoint dir)."""
    t = cfg.teacher
    if t.checkpoint and storage.exists(storage.join(t.checkpoint, "model.json")):
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
    """Use a finished ktray teacher checkpoint instead of training one. Costs no training
    compute; its forward FLOPs per image (for the logits stage's accounting) and test accuracy
    come from the stage manifest beside the checkpoint, else are counted / left out."""
    info = prepare_task(cfg)
    ckpt = cfg.teacher.checkpoint
    spec = read_spec(ckpt)
    if spec.get("num_classes") != info["num_classes"]:
        raise KtrayError(f"teacher checkpoint {ckpt} has a head of "
                         f"{spec.get('num_classes')} classes but the task has "
                         f"{info['num_classes']}")
    source = storage.join(ckpt.rstrip("/").rsplit("/", 1)[0], manifest.MANIFEST)
    src = storage.read_json(source) if storage.exists(source) else {}
    if src.get("stage") != "teacher":
        src = {}
    fpi = src.get("flops_per_image")
    if fpi is None:
        model, _ = load_model(ckpt)
        fpi = count_flops(model, spec["img_size"])
    result = {"stage": "teacher", "name": "", "outputs": {"model": ckpt},
              "config_hash": config_hash(ckpt), "adopted": True, "flops": 0.0,
              "device_seconds": 0.0, "flops_per_image": fpi}
    if src.get("test_accuracy") is not None:
        result.update(test_accuracy=src["test_accuracy"], train_seconds=0.0)
    return result
