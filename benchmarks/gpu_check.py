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
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check_common import (  # noqa: E402
    GPUS,
    IMAGES,
    OUT,
    RESULTS,
    SECONDS,
    SIZE,
    STUDENT,
    UNIQUE,
    cfg_args,
    made_at_this_size,
    mark_made,
    record,
    teacher_dir,
)


def part_data() -> None:
    """IMAGES JPEG rows (UNIQUE distinct smooth-noise images, 256-320 px) in Parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = os.path.join(OUT, "data")
    if made_at_this_size(root):
        return
    for run in ("run-vit_b", "run-vit_l"):  # the passes over the old data: not reused
        shutil.rmtree(os.path.join(OUT, run), ignore_errors=True)
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
    # What the logits pass's CPU stage can deliver: one process decoding and resizing to the
    # teacher's size (a view crop is about the same work), times the machine's cores.
    start = time.perf_counter()
    for data in jpegs[:400]:
        Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    one = 400 / (time.perf_counter() - start)
    cores = os.cpu_count() or 1
    record("JPEG decode + resize", "1 process (x cores = the CPU ceiling)", one)
    record("JPEG decode + resize", f"x {cores} cores (ceiling, not measured)", one * cores)
    mark_made(root)


def part_targets() -> None:
    """A precomputed-logits table over the IMAGES transfer rows (the logits contract: image_id,
    source, box, flip, 10 float16 logits), in parts of 2,048 rows as the logits stage writes
    them: ``distill targets`` trains on it without a logits pass first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = os.path.join(OUT, "targets")
    if made_at_this_size(out):
        return
    os.makedirs(out, exist_ok=True)
    root = os.path.join(OUT, "data")
    per_file, part_rows = 5000, 2048
    sources = [
        f"{root}/unlabeled-{i // per_file:03d}.parquet#{i % per_file}" for i in range(IMAGES)
    ]
    rng = np.random.default_rng(1)
    for p in range(-(-IMAGES // part_rows)):
        src = sources[p * part_rows : (p + 1) * part_rows]
        n = len(src)
        x0 = rng.uniform(0, 0.2, n).astype(np.float32)
        logits = rng.standard_normal((n, 10)).astype(np.float16)
        table = pa.table(
            {
                "image_id": [f"t{p}-{i}" for i in range(n)],
                "source": src,
                "x0": x0,
                "y0": x0,
                "x1": x0 + 0.8,
                "y1": x0 + 0.8,
                "flip": rng.random(n) < 0.5,
                "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 10),
            }
        )
        pq.write_table(table, os.path.join(out, f"part-{p:05d}.parquet"))
    mark_made(out)


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


def measure_afresh(run: str, stage: str) -> None:
    """Remove ``stage``'s outputs and Ray Train runs from the ``run`` folder: ktray resumes a
    stage whose outputs (or checkpoints) are there, and a second ``gpu_check.sh`` on the same
    machine would time nothing."""
    shutil.rmtree(os.path.join(run, stage), ignore_errors=True)
    ray_runs = os.path.join(run, "ray")
    for name in os.listdir(ray_runs) if os.path.isdir(ray_runs) else []:
        if name.startswith(f"{stage}-"):
            shutil.rmtree(os.path.join(ray_runs, name), ignore_errors=True)


def part_logits(key: str, decode: str = "auto") -> None:
    """``decode``: ``auto`` (ktray's choice: one-off decode tasks for a pass this short),
    ``actors`` (the decode actor pool a long pass gets: more than
    ``decode_tasks.TASK_SHARDS_PER_SLOT`` shards a decode slot, ~740k rows on 16 cores) or
    ``tasks``."""
    from ktray.config import load_config
    from ktray.stages import decode_tasks
    from ktray.stages import logits as logits_stage
    from ktray.stages.timeline import steady_rate, timeline

    if decode != "auto":
        decode_tasks.TASK_SHARDS_PER_SLOT = 0 if decode == "actors" else 10**9
    measure_afresh(os.path.join(OUT, f"run-{key}"), "logits")
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
    compute, timed = logits_stage._compute, {}

    def timed_compute(*args, **kwargs):  # the Ray Data pass alone (planning, actors, run)
        start, began = time.perf_counter(), time.time()
        try:
            stats = compute(*args, **kwargs)
            print(f"  logits {key}, where the time went: {timeline(stats, began, time.time())}")
            timed["steady"] = steady_rate(stats)
            return stats
        finally:
            timed["seconds"] = time.perf_counter() - start

    logits_stage._compute = timed_compute
    m = logits_stage.run(cfg, "in_domain", shard_rows=512, features=False)
    base, how = "bare bf16 forward (batch 256)", f"ktray logits pass ({decode} decode)"
    rows = [
        ("end to end, incl. start-up", m["rows"] / m["seconds"]),
        ("Ray Data execution", m["rows"] / timed["seconds"] if timed else None),
        # what a long pass gets once its start-up is paid
        ("steady, after the 1st shard", timed.get("steady")),
        # the model's own time: GPUs x shards' seconds
        ("inside the GPU actor", m["rows"] / (m["device_seconds"] / GPUS)),
    ]
    for what, img_s in rows:
        if img_s:
            record(f"teacher {key}", f"{how}: {what}", img_s, base, 0.9)


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


LABELS = {
    "targets": "precomputed logits",
    "precomputed": "logits from the pass",
    "online": "online ViT-B teacher",
}


def part_distill(mode: str) -> None:
    """``mode``: ``targets`` (precomputed logits from the ``targets`` part's table),
    ``precomputed`` (from the ``logits vit_b`` part's pass) or ``online`` (ViT-B teacher)."""
    import torch

    from ktray.config import load_config
    from ktray.stages import distill as distill_stage

    steps = int(os.environ.get("GPU_CHECK_STEPS", "600"))
    measure_afresh(os.path.join(OUT, "run-vit_b"), "distill")
    every = max(1, steps // 6)
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
                f"distill.teacher_mode={'online' if mode == 'online' else 'precomputed'}",
                *([f"distill.targets={os.path.join(OUT, 'targets')}"] if mode == "targets" else []),
                "ray.num_workers=1",
                f"ray.use_gpu={str(torch.cuda.is_available()).lower()}",
                f"train.report_every={every}",
                f"train.checkpoint_every={steps}",
            ]
        ),
    )
    started = time.perf_counter()
    m = distill_stage.run(cfg, "in_domain", "task")
    wall = time.perf_counter() - started
    base = "bare PyTorch bf16 KD loop (batch 128, ready tensors)"
    history = [h for h in m.get("history") or [] if "images" in h and "seconds" in h]
    if len(history) >= 3:  # after the first report: the input pipeline is full
        first, last = history[0], history[-1]
        record(
            f"student {STUDENT}",
            f"ktray distill, {LABELS[mode]}: steady (after 1st report)",
            (last["images"] - first["images"]) / (last["seconds"] - first["seconds"]),
            base,
            0.95 if mode != "online" else 0.0,
        )
    metrics = m.get("metrics") or {}
    if metrics.get("images") and metrics.get("seconds"):  # the training loop's own clock
        record(
            f"student {STUDENT}",
            f"ktray distill, {LABELS[mode]}: training loop",
            metrics["images"] / metrics["seconds"],
            base,
            0.0,
        )
    record(
        f"student {STUDENT}",
        f"ktray distill, {LABELS[mode]}: stage end to end",
        steps * 128 / wall,
        base,
        0.0,
        f"stage wall {wall:.0f}s incl. Ray Train start-up",
    )


def table() -> None:
    path = RESULTS
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
        "targets": part_targets,
        "bare": part_bare,
        "logits": part_logits,
        "bare_train": part_bare_train,
        "distill": part_distill,
        "table": table,
    }[part](*args)
