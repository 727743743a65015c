"""Deployable models: ONNX export, parity check, int8 quantisation (no ray, no Config).

:func:`export_model` turns a checkpoint folder into ``model.onnx`` (dynamic batch axis; timm's
``reparameterize_model`` first, which fuses FastViT / MobileOne / RepVGG-style branches),
checks it against PyTorch with onnxruntime on fixed inputs (max abs logit difference and top-1
agreement; a difference beyond ``atol`` is a :class:`KtrayError`), optionally writes an int8
copy (``model.int8.onnx``: onnxruntime static quantisation calibrated on images, or dynamic),
and measures the model:
parameters, forward GFLOPs, MB, CPU latency at batch 1 and throughput at batch 32 for PyTorch
and onnxruntime, in the same process so the ratios compare like with like (:mod:`ktray.speed`).

Segmentation checkpoints (``seg_student`` / ``seg_teacher``) export as
``input [N, 3, S, S] -> logits [N, C, S, S]`` (their logits upsampled to the input size inside
the graph, :mod:`ktray.dense_export`); parity and top-1 agreement are then per pixel.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings

import numpy as np
import torch
from torch import nn

from ktray import dense_export, storage
from ktray.errors import KtrayError
from ktray.models import load_model
from ktray.speed import measure_speed, median_seconds, model_stats  # noqa: F401 (public)

log = logging.getLogger("ktray")

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
SPEC_FILE = "model.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("dynamo", "torchscript")
FORMATS = ("onnx",)


def prepare(model: nn.Module) -> tuple[nn.Module, bool]:
    """An eval-mode copy of ``model`` ready to export, re-parameterised where timm can.

    Returns:
        ``(model, reparameterized)``: ``reparameterized`` is True when some module had a
        ``reparameterize`` / ``fuse`` method (FastViT, MobileOne, RepVGG, ...).
    """
    from timm.utils.model import reparameterize_model

    model = copy.deepcopy(model).eval()
    fusable = any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in model.modules())
    if fusable:
        model = reparameterize_model(model, inplace=True)
    return model, fusable


def export_onnx(model: nn.Module, path: str, img_size: int, exporter: str = "dynamo") -> str:
    """Write ``model`` (``x[B,3,S,S] -> logits[B,C]``) as ONNX with a dynamic batch axis.

    Args:
        model: An eval-mode model (see :func:`prepare`).
        path: Local file to write (atomically: temporary name, then rename).
        img_size: S, the input side.
        exporter: ``dynamo`` (``torch.export``, needs onnxscript) or ``torchscript`` (the
            legacy tracer; faster to export, deprecated by PyTorch).

    Returns:
        ``path``.

    Raises:
        KtrayError: Unknown exporter, or PyTorch cannot export the model.
    """
    if exporter not in EXPORTERS:
        raise KtrayError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    x = torch.zeros(2, 3, int(img_size), int(img_size))
    kw: dict = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    if exporter == "dynamo":
        kw.update(
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    else:
        kw.update(dynamo=False, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with storage.atomic_local_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(model, (x,), tmp, **kw)
        except Exception as e:  # exporter errors are long; the first line says what failed
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise KtrayError(f"ONNX export ({exporter}) failed: {first[:300]}") from None
    return path


def fixed_inputs(n: int, img_size: int, seed: int = 0) -> np.ndarray:
    """``n`` deterministic normalised inputs ``[n, 3, S, S]`` (float32; smooth noise, so a
    model's activations look more like those of images than white noise's do)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(2, img_size // 4), max(2, img_size // 4), generator=g)
    x = nn.functional.interpolate(
        low, size=(img_size, img_size), mode="bilinear", align_corners=False
    )
    x = x + 0.25 * torch.randn(n, 3, img_size, img_size, generator=g)
    return x.numpy().astype(np.float32)


def onnx_session(path: str, threads: int = 0):
    """A CPU onnxruntime session; ``threads`` intra-op threads (0 = torch's thread count)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No spinning: idle ORT threads would otherwise steal cores from PyTorch (measured next to
    # it) and from Ray Data's readers.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def onnx_logits(session, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of an onnxruntime session over ``x [N,3,S,S]`` in mini-batches."""
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(x[i : i + batch_size])})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32)


@torch.inference_mode()
def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of an eval-mode PyTorch model over ``x [N,3,S,S]`` in mini-batches."""
    outs = [
        model(torch.from_numpy(x[i : i + batch_size])).float().numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs)


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """``{"max_abs_diff", "top1_agreement", "n"}`` of two ``[N, C]`` logit arrays (or
    ``[N, C, H, W]``: the agreement of the argmax over C is then per pixel)."""
    if reference.shape != other.shape:
        raise KtrayError(f"logit shapes differ: {reference.shape} vs {other.shape}")
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "top1_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
        "n": int(len(reference)),
    }


def check_parity(reference: np.ndarray, other: np.ndarray, atol: float, what: str) -> dict:
    """:func:`compare`, raising when the logits differ by more than the tolerance.

    The tolerance is ``atol`` times the largest logit magnitude (at least 1): absolute for
    logits of order 1, relative for an untrained network whose logits reach 1e13.

    Raises:
        KtrayError: ``max_abs_diff > atol * max(1, max|reference|)`` (or non-finite logits).
    """
    r = compare(reference, other)
    r["tolerance"] = float(atol * max(1.0, float(np.abs(reference).max())))
    if not np.isfinite(other).all() or not r["max_abs_diff"] <= r["tolerance"]:
        raise KtrayError(
            f"{what} differs from PyTorch: max abs logit difference "
            f"{r['max_abs_diff']:.3g} > tolerance {r['tolerance']:.3g} (top-1 "
            f"agreement {r['top1_agreement']:.3f} on {r['n']} inputs)"
        )
    return r


INT8_MODES = ("static", "dynamic")


def quantize_int8(
    src: str, dst: str, mode: str = "static", calibration: np.ndarray | None = None
) -> str:
    """int8 quantisation of an ONNX file with onnxruntime, written atomically.

    ``static``: int8 weights (per channel) and activations (QDQ format) with activation ranges
    calibrated on ``calibration`` inputs; on CPU CNNs it runs 2-4x faster than fp32.
    ``dynamic``: int8 weights, activations quantised at run time; no calibration, but
    onnxruntime's ConvInteger kernels make CNNs 3-10x *slower* than fp32 (it suits MatMul-heavy
    transformers). Both start from onnxruntime's shape-inference pre-processing.

    Raises:
        KtrayError: Unknown mode, or ``static`` without calibration inputs.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise KtrayError(f"unknown int8 mode {mode!r}; choose one of {', '.join(INT8_MODES)}")
    if mode == "static" and (calibration is None or not len(calibration)):
        raise KtrayError("static int8 quantisation needs calibration inputs")

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [
                    {INPUT_NAME: np.ascontiguousarray(calibration[i : i + 16])}
                    for i in range(0, len(calibration), 16)
                ]
            )

        def get_next(self):
            return next(self.batches, None)

    logging.getLogger("root").setLevel(logging.ERROR)  # ORT's quantizer warns via root
    with storage.atomic_local_path(dst) as tmp:
        pre = tmp + ".pre.onnx"
        try:
            quant_pre_process(src, pre)
            if mode == "dynamic":
                quantize_dynamic(pre, tmp, weight_type=QuantType.QInt8)
            else:
                quantize_static(
                    pre,
                    tmp,
                    _Batches(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                )
        finally:
            for f in (pre, pre + ".data"):
                if os.path.exists(f):
                    os.remove(f)
    return dst


def megabytes(path: str) -> float:
    return os.path.getsize(path) / 1e6


def export_model(
    model_dir: str,
    out_dir: str,
    *,
    int8: bool = False,
    int8_mode: str = "static",
    exporter: str = "dynamo",
    atol: float = 1e-3,
    check_images: int = 32,
    speed_iters: int = 0,
    inputs: np.ndarray | None = None,
    calibration: np.ndarray | None = None,
) -> dict:
    """Export a checkpoint folder to ONNX under ``out_dir`` and check it.

    Args:
        model_dir: A checkpoint folder (``model.json`` + ``model.safetensors``).
        out_dir: Local output folder: ``model.onnx``, ``model.int8.onnx`` (``int8``) and a copy
            of ``model.json`` (preprocessing: size, mean, std; ``ktray predict`` reads it).
        int8: Also write the int8 model; its top-1 agreement with PyTorch is reported, not
            enforced (int8 logits differ by design).
        int8_mode: ``static`` or ``dynamic`` (see :func:`quantize_int8`).
        exporter: See :func:`export_onnx`.
        atol: Largest max-abs logit difference the fp32 ONNX model may have.
        check_images: How many fixed inputs the check uses (when ``inputs`` is None).
        speed_iters: Timed iterations per speed measurement (0 = no speed measurement).
        inputs: Normalised inputs ``[N,3,S,S]`` to check on instead of the fixed ones.
        calibration: Normalised inputs that calibrate static int8 (default: other fixed
            inputs than the check's, so the check does not grade its own calibration).

    Returns:
        A summary: files, their MB, parity (``onnx`` and ``int8``), model stats, speed.

    Raises:
        KtrayError: No checkpoint, an export failure, or a parity failure beyond ``atol``.
    """
    started = time.perf_counter()
    model, spec = load_model(model_dir)
    model = dense_export.exportable(model, spec)  # segmentation: logits at the input size
    size = int(spec["img_size"])
    ready, fused = prepare(model)
    os.makedirs(out_dir, exist_ok=True)
    onnx_path = export_onnx(ready, os.path.join(out_dir, ONNX_FILE), size, exporter)
    x = inputs if inputs is not None else fixed_inputs(check_images, size)
    reference = torch_logits(model, x)
    layout = ["N", "C", "S", "S"] if dense_export.is_dense(spec) else ["N", "C"]
    parity = {
        "onnx": check_parity(
            reference, onnx_logits(onnx_session(onnx_path), x), atol, f"ONNX export of {model_dir}"
        )
    }
    files = {"onnx": onnx_path}
    if int8:
        if calibration is None:
            calibration = fixed_inputs(max(16, check_images), size, seed=1)
        try:
            files["int8"] = quantize_int8(
                onnx_path, os.path.join(out_dir, INT8_FILE), int8_mode, calibration
            )
            parity["int8"] = compare(reference, onnx_logits(onnx_session(files["int8"]), x))
        except Exception as e:  # onnxruntime's quantiser or an int8 kernel it lacks
            if isinstance(e, KtrayError) and "int8" in str(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise KtrayError(
                f"int8 ({int8_mode}) quantisation of {model_dir} failed: {type(e).__name__}: "
                f"{first}; the fp32 {onnx_path} is fine (export.int8=false skips int8)"
            ) from None
    storage.write_text(
        os.path.join(out_dir, SPEC_FILE),
        json.dumps(
            dict(spec, onnx_input=INPUT_NAME, onnx_output=OUTPUT_NAME, onnx_output_axes=layout),
            indent=2,
        ),
    )
    result = {
        "model": model_dir,
        "kind": spec["kind"],
        "arch": spec["arch"],
        "img_size": size,
        "num_classes": spec["num_classes"],
        "output_shape": ["batch", *(int(d) for d in reference.shape[1:])],
        "exporter": exporter,
        "reparameterized": fused,
        "int8_mode": int8_mode if int8 else None,
        "atol": atol,
        "files": files,
        "file_mb": {k: megabytes(v) for k, v in files.items()},
        "parity": parity,
        **model_stats(model, size),
    }
    if speed_iters > 0:
        result["speed"] = measure_speed(model, size, files, speed_iters)
    result["seconds"] = time.perf_counter() - started
    log.info(
        "export: %s -> %s (max abs diff %.2g, top-1 agreement %.3f)",
        model_dir,
        onnx_path,
        parity["onnx"]["max_abs_diff"],
        parity["onnx"]["top1_agreement"],
    )
    return result
