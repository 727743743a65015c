"""Model size and CPU speed, measured in this process (no ray): parameters, GFLOPs and MB of a
model, and latency (batch 1) / throughput (batch 32) of PyTorch eager and of ONNX files under
onnxruntime, so that ratios between models (or backends) compare like with like.
``ktray.export`` re-exports these for the speed table of every run.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ktray.models import count_flops


def model_stats(model: nn.Module, img_size: int) -> dict:
    """``{"params", "gflops", "mb"}``: parameter count, forward GFLOPs of one image
    (:func:`ktray.models.count_flops`), fp32 weights + buffers in MB."""
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "gflops": count_flops(model, img_size) / 1e9,
        "mb": nbytes / 1e6,
    }


def median_seconds(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speed(
    model: nn.Module,
    img_size: int,
    onnx_files: dict[str, str],
    iters: int = 10,
    batch_size: int = 32,
) -> dict:
    """CPU latency (batch 1, ms) and throughput (batch ``batch_size``, img/s) of the PyTorch
    model (eager, channels_last as ktray's predictors run it) and of each ONNX file.

    Returns:
        ``{"pytorch": {"latency_ms", "throughput"}, NAME: {...} for NAME in onnx_files,
        "threads": torch threads, "iters": iters}``.
    """
    from ktray.export import fixed_inputs, onnx_session

    x1, xb = fixed_inputs(1, img_size, 1), fixed_inputs(batch_size, img_size, 2)
    m = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    t1 = torch.from_numpy(x1).contiguous(memory_format=torch.channels_last)
    tb = torch.from_numpy(xb).contiguous(memory_format=torch.channels_last)
    out: dict = {}
    with torch.inference_mode():
        out["pytorch"] = _row(
            median_seconds(lambda: m(t1), iters), median_seconds(lambda: m(tb), iters), batch_size
        )
    for name, path in onnx_files.items():
        session = onnx_session(path)
        run = session.run
        feed = session.get_inputs()[0].name
        out[name] = _row(
            median_seconds(lambda r=run, f=feed: r(None, {f: x1}), iters),
            median_seconds(lambda r=run, f=feed: r(None, {f: xb}), iters),
            batch_size,
        )
    out.update(threads=torch.get_num_threads(), iters=int(iters), batch_size=batch_size)
    return out


def _row(latency_s: float, batch_s: float, batch_size: int) -> dict:
    return {"latency_ms": latency_s * 1e3, "throughput": batch_size / batch_s}
