"""Shared body of the three Ray Train stages (teacher, distill, finetune)."""

from __future__ import annotations

import logging
import time

from ktray import storage
from ktray.pipeline import manifest
from ktray.config import Config, config_hash
from ktray.evaluation import evaluate_model_dir
from ktray.stages.common import RaySession, add_trial_steps, ensure_ray, fit, in_tune_trial
from ktray.pipeline.tasks import prepare_task
from ktray.train.worker import run_training
from ktray.pipeline.validate import check_config

log = logging.getLogger("ktray")


def train_worker(spec: dict) -> dict:
    """Ray Train's per-worker function; returns the final metrics (``Result.return_value``)."""
    session = RaySession(spec.get("tune"))
    metrics = run_training(spec, session)
    if session.tune is None:  # (Tune already has the last epoch's report)
        session.report({k: v for k, v in metrics.items() if k != "history"}, None)
    return metrics


def common_spec(cfg: Config, num_classes: int, out_dir: str, seed_offset: int = 0) -> dict:
    return {"num_classes": num_classes, "out_dir": out_dir, "seed": cfg.data.seed + seed_offset,
            "student": {"arch": cfg.student.arch, "img_size": cfg.student.img_size,
                        "pretrained": cfg.student.pretrained,
                        "checkpoint": cfg.student.checkpoint}}


def run_train_stage(cfg: Config, stage: str, name: str, spec: dict, hash_parts: tuple,
                    evaluate: bool = True) -> dict:
    """Train ``spec`` with Ray Train unless a finished run with the same config exists, then
    evaluate the saved model on the test split and write the manifest."""
    check_config(cfg)
    info = prepare_task(cfg)
    out = manifest.stage_dir(cfg.out, stage, name)
    h = config_hash(*hash_parts, cfg.data, info["config_hash"])
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("%s: reusing the finished run in %s", f"{stage}[{name}]" if name else stage, out)
        if in_tune_trial():
            add_trial_steps(stage, done.get("steps"))
        return done
    model_dir = storage.join(out, "model")
    spec = dict(spec, out_dir=model_dir, num_classes=info["num_classes"],
                train_uri=info["outputs"]["train"], val_uri=info["outputs"].get("val", ""))
    ensure_ray(cfg.ray)
    log.info("%s: training %s steps", f"{stage}[{name}]" if name else stage, spec["steps"])
    start = time.perf_counter()
    metrics = fit(cfg, f"{stage}-{name}" if name else stage, train_worker, spec)
    seconds = time.perf_counter() - start
    history = metrics.pop("history", None) or []
    result = {"stage": stage, "name": name, "config_hash": h,
              "outputs": {"model": model_dir}, "train_seconds": seconds,
              "device_seconds": metrics.get("seconds", seconds) * max(1, cfg.ray.num_workers),
              "flops": metrics.get("flops"), "flops_per_image": metrics.get("flops_per_image"),
              "steps": metrics.get("step"),
              "images_seen": metrics.get("images"), "final_loss": metrics.get("loss"),
              "metrics": metrics, "history": history}
    if evaluate:
        ev = evaluate_model_dir(model_dir, info["outputs"]["test"], cfg.eval_batch_size,
                                num_classes=info["num_classes"])
        result.update(test_accuracy=ev["test_accuracy"],
                      per_class_accuracy=ev.get("per_class_accuracy"))
        log.info("%s: test accuracy %.4f", f"{stage}[{name}]" if name else stage, ev["test_accuracy"])
    return manifest.write(out, result, cfg)
