"""``ktray teacher``: adapt the VFM to the task (backbone + task head) with Ray Train."""

from __future__ import annotations

from ktray import storage
from ktray.config import Config, config_hash
from ktray.errors import KtrayError
from ktray.models import load_model, read_spec
from ktray.models.flops import count_flops
from ktray.pipeline import manifest
from ktray.pipeline.tasks import prepare_task
from ktray.stages.train_stage import run_train_stage, table_fingerprint
from ktray.train.specs import TeacherSpec


def run(cfg: Config) -> dict:
    """Train (or reuse) the adapted teacher; manifest outputs: ``model`` (checkpoint dir).

    Reused whenever the spec and the labeled train (and validation) images are the same: the
    test split or the transfer sets do not retrain it."""
    t = cfg.teacher
    if t.checkpoint and storage.exists(storage.join(t.checkpoint, "model.json")):
        return _adopt(cfg)
    info = prepare_task(cfg)
    spec = TeacherSpec.from_config(cfg, info["rows"]["train"])
    train_uri, val_uri = info["outputs"]["train"], info["outputs"].get("val", "")
    inputs = {"train_uri": train_uri, "val_uri": val_uri}
    hash_inputs = {
        "train": table_fingerprint(train_uri, files=True),  # a labeled image replaced: retrain
        "val": table_fingerprint(val_uri, files=True),
        "num_classes": info["num_classes"],
    }
    return run_train_stage(cfg, "teacher", "", spec, inputs, hash_inputs)


def _adopt(cfg: Config) -> dict:
    """Use a finished ktray teacher checkpoint instead of training one. Costs no training
    compute; its forward FLOPs per image (for the logits stage's accounting) and test accuracy
    come from the stage manifest beside the checkpoint, else are counted / left out."""
    info = prepare_task(cfg)
    ckpt = cfg.teacher.checkpoint
    spec = read_spec(ckpt)
    if spec.get("num_classes") != info["num_classes"]:
        raise KtrayError(
            f"teacher checkpoint {ckpt} has a head of "
            f"{spec.get('num_classes')} classes but the task has "
            f"{info['num_classes']}"
        )
    source = storage.join(ckpt.rstrip("/").rsplit("/", 1)[0], manifest.MANIFEST)
    src = storage.read_json(source) if storage.exists(source) else {}
    if src.get("stage") != "teacher":
        src = {}
    fpi = src.get("flops_per_image")
    if fpi is None:
        model, _ = load_model(ckpt)
        fpi = count_flops(model, spec["img_size"])
    result = {
        "stage": "teacher",
        "name": "",
        "outputs": {"model": ckpt},
        "config_hash": config_hash(ckpt),
        "adopted": True,
        "flops": 0.0,
        "device_seconds": 0.0,
        "flops_per_image": fpi,
    }
    if src.get("test_accuracy") is not None:
        result.update(test_accuracy=src["test_accuracy"], train_seconds=0.0)
    return result
