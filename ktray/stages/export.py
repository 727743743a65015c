"""``ktray export MODEL_DIR out=DIR``: a checkpoint as ONNX (+ int8), checked and measured.

Writes ``DIR/model.onnx`` (dynamic batch axis), optionally ``DIR/model.int8.onnx``, a copy of
``model.json`` (the preprocessing) and, last, ``DIR/manifest.json``: parity with PyTorch (max
abs logit difference, top-1 agreement), parameters, GFLOPs, MB, CPU latency / throughput of
PyTorch and onnxruntime measured in the same process and, when a task config is given
(``--config``), the test accuracy (segmentation: test mIoU) of PyTorch, the fp32 and the int8
ONNX model side by side (static int8 is then calibrated on the labeled training images).
Segmentation models export as ``logits [N, C, S, S]`` (see :mod:`ktray.dense_export`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from ktray import dense_export, export, storage
from ktray.config import Config
from ktray.data.sources import load_images
from ktray.data.views import eval_transform
from ktray.errors import KtrayError
from ktray.models import load_model, read_spec
from ktray.pipeline import manifest

log = logging.getLogger("ktray")
CHUNK = 256


def default_out(model_dir: str) -> str:
    """``OUT/finetune/scratch/model`` -> ``OUT/finetune/scratch/export``."""
    return (
        storage.join(model_dir.rstrip("/").rsplit("/", 1)[0], "export")
        if "/" in model_dir.rstrip("/")
        else "export"
    )


def normalised(table, spec: dict, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Readable images of an image table as ``[N,3,S,S]`` model inputs, with their labels."""
    if limit:
        table = table.slice(0, limit)
    images = load_images(table["source"].to_pylist())
    labels = table["label"].to_pylist() if "label" in table.column_names else [-1] * len(images)
    keep = [(img, y) for img, y in zip(images, labels) if img is not None]
    if not keep:
        return np.zeros((0, 3, spec["img_size"], spec["img_size"]), np.float32), np.zeros(0)
    x = np.stack(
        [
            eval_transform(img, spec["img_size"], spec["mean"], spec["std"]).numpy()
            for img, _ in keep
        ]
    )
    return x.astype(np.float32), np.asarray([y for _, y in keep], np.int64)


def test_accuracy(model_dir: str, files: dict, table, spec: dict) -> dict:
    """Test accuracy of PyTorch and of each ONNX file, over the same images in chunks."""
    model, _ = load_model(model_dir)
    runners = {"pytorch": lambda x: export.torch_logits(model, x)}
    for name, path in files.items():
        session = export.onnx_session(path)
        runners[name] = lambda x, s=session: export.onnx_logits(s, x)
    correct, n = dict.fromkeys(runners, 0), 0
    for start in range(0, len(table), CHUNK):
        x, y = normalised(table.slice(start, CHUNK), spec)
        for name, fn in runners.items():
            correct[name] += int((fn(x).argmax(1) == y).sum())
        n += len(y)
    if not n:
        raise KtrayError("no readable test image to measure accuracy on")
    return {name: c / n for name, c in correct.items()} | {"images": n}


def run(cfg: Config, model_dir: str, with_task: bool = False) -> dict:
    """Export the checkpoint in ``model_dir`` under ``cfg.out`` (default: beside it, in
    ``export/``); see the module docstring."""
    spec = read_spec(model_dir)  # a one-line error before any work when there is no checkpoint
    ec = cfg.export
    out = cfg.out or default_out(model_dir)
    started = time.perf_counter()
    calibration = test = None
    if with_task:
        from ktray.pipeline.tasks import split_table

        train = split_table(cfg, "train")
        calibration, _ = normalised(train, spec, limit=max(ec.check_images, 16))
        test = split_table(cfg, "test")
    with tempfile.TemporaryDirectory() as tmp:
        local = out if not storage.is_remote(out) else tmp
        r = export.export_model(
            model_dir,
            local,
            int8=ec.int8,
            int8_mode=ec.int8_mode,
            exporter=ec.exporter,
            atol=ec.atol,
            check_images=ec.check_images,
            speed_iters=ec.speed_iters,
            calibration=calibration,
        )
        if test is not None and dense_export.is_dense(spec):  # segmentation: test mIoU
            model = dense_export.exportable(load_model(model_dir)[0], spec)
            r["test_miou"] = dense_export.miou_by_backend(
                model, r["files"], test, spec, cfg.data.ignore_index
            )
        elif test is not None:
            r["test_accuracy"] = test_accuracy(model_dir, r["files"], test, spec)
        if storage.is_remote(out):
            for name in os.listdir(local):
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes(storage.join(out, name), f.read())
            r["files"] = {k: storage.join(out, os.path.basename(v)) for k, v in r["files"].items()}
    r.update(
        stage="export",
        name=os.path.basename(model_dir.rstrip("/")),
        config_hash="",
        outputs=dict(r["files"], dir=out),
        seconds=time.perf_counter() - started,
        flops=None,
        device_seconds=r["seconds"],
    )
    return manifest.write(out, r, cfg)


def summary(r: dict) -> str:
    """A few human lines about an export manifest."""
    p = r["parity"]
    lines = [
        f"{r['arch']} ({r['kind']}) @ {r['img_size']} px: {r['params'] / 1e6:.2f} M params, "
        f"{r['gflops']:.3f} GFLOPs, {r['mb']:.1f} MB, output logits "
        f"[{', '.join(str(d) for d in r.get('output_shape') or [])}]",
        f"onnx: {r['files']['onnx']} ({r['file_mb']['onnx']:.1f} MB), max abs logit diff "
        f"{p['onnx']['max_abs_diff']:.2g}, top-1 agreement {p['onnx']['top1_agreement']:.3f}",
    ]
    if "int8" in r["files"]:
        lines.append(
            f"int8 ({r['int8_mode']}): {r['files']['int8']} ({r['file_mb']['int8']:.1f} "
            f"MB), top-1 agreement {p['int8']['top1_agreement']:.3f}"
        )
    for name, s in (r.get("speed") or {}).items():
        if isinstance(s, dict):
            lines.append(
                f"{name:8s} latency {s['latency_ms']:.2f} ms (batch 1), "
                f"{s['throughput']:.0f} img/s (batch {r['speed']['batch_size']})"
            )
    for key, what in (("test_accuracy", "test accuracy"), ("test_miou", "test mIoU")):
        if not r.get(key):
            continue
        acc = r[key]
        lines.append(
            f"{what}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in acc.items() if k != "images")
            + f" ({acc['images']} images)"
        )
    return "\n".join(lines)
