"""GPU check parts, run by ``benchmarks/gpu_check.sh`` (one part per process).

Each part appends result rows (JSON lines) to ``$GPU_CHECK_OUT/results.jsonl``:
``{"what", "path", "img_s", "baseline", "goal"}``; ``table`` prints them with the ratios.

Parts:
- ``data``: JPEG Parquet task data (img2dataset layout) under ``$GPU_CHECK_OUT/data``.
- ``bare MODEL``: bare bf16 forward of a random-weight teacher (the baseline of ``logits``).
- ``logits MODEL``: ktray's logits pass (Ray Data: CPU decode stage + GPU actors) over the
  JPEG Parquet transfer set, the teacher adopted from a random-weight checkpoint.
- ``bare_train``: bare PyTorch bf16 distillation loop (FastViT-S12, ready tensors, KD loss).
- ``distill MODE``: ktray's distillation stage (Ray Train + Ray Data input), ``precomputed``
  or ``online`` teacher.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np

OUT = os.environ.get("GPU_CHECK_OUT", "/tmp/ktray-gpu-check")
IMAGES = int(os.environ.get("GPU_CHECK_IMAGES", "20000"))
SECONDS = float(os.environ.get("GPU_CHECK_SECONDS", "8"))  # each bare baseline's timed loop
UNIQUE = 4000
SIZE = 224
MODELS = {"vit_b": "vit_base_patch16_224", "vit_l": "vit_large_patch16_224"}
STUDENT = "fastvit_s12"


def record(
    what: str, path: str, img_s: float, baseline: str = "", goal: float = 0.0, note: str = ""
) -> None:
    os.makedirs(OUT, exist_ok=True)
    row = {
        "what": what,
        "path": path,
        "img_s": img_s,
        "baseline": baseline,
        "goal": goal,
        "note": note,
    }
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def part_data() -> None:
    """IMAGES JPEG rows (UNIQUE distinct smooth-noise images, 256-320 px) in Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = os.path.join(OUT, "data")
    if os.path.exists(os.path.join(root, "done")):
        return
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs, labels = [], []
    for i in range(UNIQUE):
        side = int(rng.integers(256, 321))
        small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
        labels.append(i % 10)
    for split, n in (("train", 100), ("test", 500)):
        pq.write_table(
            pa.table({"jpg": jpegs[:n], "label": labels[:n]}),
            os.path.join(root, f"{split}.parquet"),
        )
    per_file = 5000
    for f in range(-(-IMAGES // per_file)):
        idx = [(f * per_file + j) % UNIQUE for j in range(min(per_file, IMAGES - f * per_file))]
        pq.write_table(
            pa.table({"jpg": [jpegs[i] for i in idx], "label": [-1] * len(idx)}),
            os.path.join(root, f"unlabeled-{f:03d}.parquet"),
            row_group_size=512,
        )
    open(os.path.join(root, "done"), "w").close()


def teacher_dir(key: str) -> str:
    """A random-weight ktray teacher checkpoint (TaskModel, 10 classes, 224 px)."""
    from ktray.models import TaskModel, create_backbone, save_model

    d = os.path.join(OUT, f"teacher-{key}")
    if not os.path.exists(os.path.join(d, "model.json")):
        backbone = create_backbone(MODELS[key], pretrained=False, img_size=SIZE)
        save_model(
            TaskModel(backbone, 10),
            d,
            {
                "kind": "teacher",
                "arch": MODELS[key],
                "backbone": MODELS[key],
                "num_classes": 10,
                "img_size": SIZE,
                "mean": list(backbone.mean),
                "std": list(backbone.std),
            },
        )
    return d


def part_bare(key: str) -> None:
    import torch

    from ktray.models import load_model

    model, _ = load_model(teacher_dir(key))
    model = model.eval().to("cuda", torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(256, 3, SIZE, SIZE, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        for _ in range(5):
            model.forward_all(x)
        torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            model.forward_all(x)
            n += len(x)
        torch.cuda.synchronize()
    record(f"teacher {key}", "bare bf16 forward (batch 256)", n / (time.perf_counter() - start))


def cfg_args(extra: list[str]) -> list[str]:
    return [
        f"data.root={os.path.join(OUT, 'data')}",
        "data.kind=parquet",
        "data.labels_per_class=0",
        "data.generic_images=0",
        "tracking.mlflow=false",
        "ray.shared_storage=true",
        *extra,
    ]


def part_logits(key: str) -> None:
    from ktray.config import load_config
    from ktray.stages import logits as logits_stage

    cfg = load_config(
        "imagefolder",
        cfg_args(
            [
                f"out={os.path.join(OUT, 'run-' + key)}",
                f"teacher.checkpoint={teacher_dir(key)}",
                f"teacher.img_size={SIZE}",
                "logits.views=1",
                "logits.batch_size=256",
            ]
        ),
    )
    m = logits_stage.run(cfg, "in_domain", shard_rows=512, features=False)
    actors = max(1, int(os.environ.get("GPU_CHECK_GPUS", "1")))
    record(
        f"teacher {key}",
        "ktray logits pass, JPEG Parquet (end to end, incl. start-up)",
        m["rows"] / m["seconds"],
        "bare bf16 forward (batch 256)",
        0.9,
    )
    record(
        f"teacher {key}",
        "ktray logits pass (inside the GPU actor)",
        m["rows"] / (m["device_seconds"] / actors),
        "bare bf16 forward (batch 256)",
        0.9,
    )


def part_bare_train() -> None:
    import timm
    import torch
    import torch.nn.functional as F

    model = (
        timm.create_model(STUDENT, pretrained=False, num_classes=10)
        .cuda()
        .to(memory_format=torch.channels_last)
        .train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(128, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randn(128, 10, device="cuda").softmax(-1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).float()
        loss = F.kl_div(F.log_softmax(logits / 2, -1), target, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        step()
        n += len(x)
    torch.cuda.synchronize()
    record(
        f"student {STUDENT}",
        "bare PyTorch bf16 KD loop (batch 128, ready tensors)",
        n / (time.perf_counter() - start),
    )


def part_distill(mode: str) -> None:
    import torch

    from ktray.config import load_config
    from ktray.stages import distill as distill_stage

    steps = int(os.environ.get("GPU_CHECK_STEPS", "200"))
    cfg = load_config(
        "imagefolder",
        cfg_args(
            [
                f"out={os.path.join(OUT, 'run-vit_b')}",
                f"teacher.checkpoint={teacher_dir('vit_b')}",
                f"teacher.img_size={SIZE}",
                "logits.views=1",
                f"student.arch={STUDENT}",
                f"student.img_size={SIZE}",
                f"distill.steps={steps}",
                "distill.batch_size=128",
                f"distill.teacher_mode={mode}",
                "ray.num_workers=1",
                f"ray.use_gpu={str(torch.cuda.is_available()).lower()}",
                f"train.report_every={steps}",
                f"train.checkpoint_every={steps}",
            ]
        ),
    )
    started = time.perf_counter()
    m = distill_stage.run(cfg, "in_domain", "task")
    wall = time.perf_counter() - started
    base = "bare PyTorch bf16 KD loop (batch 128, ready tensors)"
    metrics = m.get("metrics") or {}
    if metrics.get("images") and metrics.get("seconds"):  # the training loop's own clock
        record(
            f"student {STUDENT}",
            f"ktray distill, {mode} teacher (ViT-B): training loop",
            metrics["images"] / metrics["seconds"],
            base,
            0.95 if mode == "precomputed" else 0.0,
        )
    record(
        f"student {STUDENT}",
        f"ktray distill, {mode} teacher (ViT-B): stage end to end",
        steps * 128 / wall,
        base,
        0.0,
        f"stage wall {wall:.0f}s incl. Ray Train start-up",
    )


def table() -> None:
    path = os.path.join(OUT, "results.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    base = {(r["what"], r["path"]): r["img_s"] for r in rows}
    print(f"\n{'what':22s} {'path':62s} {'img/s':>8s} {'ratio':>6s} {'goal':>5s}")
    for r in rows:
        b = base.get((r["what"], r["baseline"]))
        ratio = f"{r['img_s'] / b:6.2f}" if b else "     -"
        goal = f"{r['goal']:5.2f}" if r["goal"] else "    -"
        print(f"{r['what']:22s} {r['path'][:62]:62s} {r['img_s']:8.0f} {ratio} {goal} {r['note']}")


if __name__ == "__main__":
    part, args = sys.argv[1], sys.argv[2:]
    {
        "data": part_data,
        "bare": part_bare,
        "logits": part_logits,
        "bare_train": part_bare_train,
        "distill": part_distill,
        "table": table,
    }[part](*args)
