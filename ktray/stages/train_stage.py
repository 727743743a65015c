"""Shared body of the three Ray Train stages (teacher, distill, finetune)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

from ktray import storage
from ktray.config import Config, config_hash
from ktray.data import columns as C
from ktray.data.segmentation import MASK
from ktray.pipeline import manifest
from ktray.pipeline.tasks import prepare_task
from ktray.pipeline.validate import check_config
from ktray.stages import evaluate as evaluate_stage
from ktray.stages.common import RaySession, add_trial_steps, ensure_ray, fit, in_tune_trial
from ktray.train.worker import run_training

log = logging.getLogger("ktray")


def train_worker(config: dict) -> dict:
    """Ray Train's per-worker function; returns the final metrics (``Result.return_value``)."""
    session = RaySession(config.get("tune"))
    metrics = run_training(config, session)
    if session.tune is None:  # (Tune already has the last report)
        lists = ("history", "val_history")
        session.report({k: v for k, v in metrics.items() if k not in lists}, None)
    return metrics


def table_fingerprint(uri: str, files: bool = False) -> str:
    """A hash of an image table's content (ids, sources, labels): what a stage trained on,
    whatever config produced it (``data.test_limit`` does not change the train split). With
    ``files``, also the sizes and modification times of the files its sources (and masks)
    name (:func:`ktray.storage.files_fingerprint`): an image replaced under the same name
    changes it. For the labeled splits (a few images a class); a test set of 50k files on
    s3 would cost 50k requests."""
    if not uri:
        return ""
    table = storage.read_parquet(uri)
    h = hashlib.sha256()
    for name in (C.IMAGE_ID, C.SOURCE, C.LABEL):
        if name in table.column_names:
            h.update("\x00".join(map(str, table.column(name).to_pylist())).encode())
    if files:
        named = [c for c in (C.SOURCE, MASK) if c in table.column_names]
        paths = {s.partition("#")[0] for c in named for s in table.column(c).to_pylist() if s}
        h.update(storage.files_fingerprint(paths).encode())
    return h.hexdigest()[:16]


def run_train_stage(
    cfg: Config,
    stage: str,
    name: str,
    spec,
    inputs: dict,
    hash_inputs: dict,
    evaluate: bool = True,
    datasets: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Train ``spec`` with Ray Train unless a finished run with the same spec and inputs
    exists, then evaluate the saved model on the test split and write the manifest.

    Args:
        spec: a :mod:`ktray.train.specs` spec (every setting the run uses).
        inputs: what the worker reads besides the spec (upstream URIs, class count, ...).
        hash_inputs: the upstream outputs' identities (hashes, content fingerprints): with
            the spec they make the reuse key ``config_hash(spec, hash_inputs)``.
        datasets: Ray Data datasets for ``TorchTrainer(datasets=...)``; a callable returning
            them is called only when the stage really trains.
        extra: more manifest fields (e.g. whether distillation read the logits stage).
    """
    check_config(cfg)
    info = prepare_task(cfg)
    out = manifest.stage_dir(cfg.out, stage, name)
    label = f"{stage}[{name}]" if name else stage
    test_uri = info["outputs"]["test"]
    h = config_hash(spec, hash_inputs)
    done = manifest.load_finished(out, h)
    if done is not None:
        log.info("%s: reusing the finished run in %s", label, out)
        if in_tune_trial():
            add_trial_steps(stage, done.get("steps"))
        test_fp = table_fingerprint(test_uri) if evaluate else ""
        if evaluate and done.get("test_fingerprint") != test_fp:  # another test split
            done = _evaluate(dict(done), test_uri, test_fp, cfg, info, label)
            return manifest.write(out, done, cfg)
        return done
    model_dir = storage.join(out, "model")
    inputs = dict(inputs, out_dir=model_dir, num_classes=info["num_classes"])
    ensure_ray(cfg.ray)
    if callable(datasets):
        datasets = datasets()
    if datasets and hasattr(datasets.get("train"), "passes"):  # passes per execution
        inputs["passes"] = datasets["train"].passes
    log.info("%s: training %s steps", label, spec.steps)
    start = time.perf_counter()
    # The Ray Train run is named after the spec's hash: Train restores the latest checkpoint
    # of a run of the same name, so a killed run resumes, and a changed spec starts afresh
    # instead of resuming from another configuration's checkpoint.
    metrics = fit(
        cfg,
        f"{stage}-{name}-{h[:8]}" if name else f"{stage}-{h[:8]}",
        train_worker,
        {"spec": dataclasses.asdict(spec), "inputs": inputs},
        datasets=datasets,
    )
    seconds = time.perf_counter() - start
    history = metrics.pop("history", None) or []
    result = {
        "stage": stage,
        "name": name,
        "config_hash": h,
        "outputs": {"model": model_dir},
        "train_seconds": seconds,
        "device_seconds": metrics.get("seconds", seconds) * max(1, cfg.ray.num_workers),
        "flops": metrics.get("flops"),
        "flops_per_image": metrics.get("flops_per_image"),
        "steps": metrics.get("step"),
        "images_seen": metrics.get("images"),
        "final_loss": metrics.get("loss"),
        "metrics": metrics,
        "history": history,
        **_selection(metrics),
        **(extra or {}),
    }
    if evaluate:
        result = _evaluate(result, test_uri, table_fingerprint(test_uri), cfg, info, label)
    return manifest.write(out, result, cfg)


def _selection(metrics: dict) -> dict:
    """Which step's weights were saved (finetuning, ``finetune.select``): ``selected_step``,
    ``val_accuracy`` of those weights (None without a validation split), ``select`` and
    ``val_history`` (``[{step, val_accuracy}]``); nothing for the other stages."""
    if "selected_step" not in metrics:
        return {}
    return {
        "selected_step": metrics["selected_step"],
        "val_accuracy": metrics.get("selected_val_accuracy"),
        "select": metrics.get("select"),
        "val_history": metrics.get("val_history") or [],
        "stopped_early": bool(metrics.get("stopped_early")),
    }


def _evaluate(
    result: dict, test_uri: str, test_fp: str, cfg: Config, info: dict, label: str
) -> dict:
    # a large test set: Ray Data batch inference on the cluster, else in this process
    ev = evaluate_stage.evaluate(cfg, result["outputs"]["model"], test_uri, info["num_classes"])
    if "test_miou" in ev:  # segmentation
        keys = ("test_miou", "test_pixel_accuracy", "per_class_iou")
        result.update({k: ev[k] for k in keys}, test_fingerprint=test_fp)
        log.info("%s: test mIoU %.4f", label, ev["test_miou"])
        return result
    result.update(
        test_accuracy=ev["test_accuracy"],
        test_fingerprint=test_fp,
        per_class_accuracy=ev.get("per_class_accuracy"),
    )
    log.info("%s: test accuracy %.4f", label, ev["test_accuracy"])
    return result
