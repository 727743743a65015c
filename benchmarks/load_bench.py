"""Model start-up: ``ktray.models.load_model`` against the plain PyTorch way, same run.

Every model actor (logits, evaluation, prediction) and an online teacher's training
worker loads its model from a checkpoint folder before its first batch. Rows, for each
architecture, each load in a fresh process with one torch thread (what a 1-CPU actor has): the
plain way (the architecture built by timm, which initialises random weights, then
``load_state_dict`` of the file's tensors, ``safetensors.torch.load_file``) and ``load_model``
(built on the meta device, the file's tensors mapped and assigned). Each time includes reading
every weight once (a sum over the parameters: what the copy to the GPU does), and the process's
peak RSS. The checkpoints are written first (random weights; ViT-L/16 is 1.2 GB on disk, read
from the page cache).
Usage:

    python benchmarks/load_bench.py [--archs vit_base_patch16_224,vit_large_patch16_224]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def child(way: str, path: str) -> dict:
    """One load in this (fresh) process."""
    import torch
    from safetensors.torch import load_file

    from ktray.models import load_model
    from ktray.models.checkpoint import build_from_spec, read_spec
    from ktray.models.weights import load_state_dict_into

    torch.set_num_threads(1)
    start = time.perf_counter()  # imports apart: the same for both ways
    if way == "plain":
        model = build_from_spec(read_spec(path))  # timm's random initialisation
        load_state_dict_into(model, load_file(os.path.join(path, "model.safetensors")), path)
    else:
        model, _ = load_model(path)
    loaded = time.perf_counter() - start
    with torch.no_grad():
        for p in model.parameters():  # read every weight once, as a copy to the device does
            p.sum()
    return {
        "load_s": loaded,
        "total_s": time.perf_counter() - start,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="vit_base_patch16_224,vit_large_patch16_224")
    ap.add_argument("--repeat", type=int, default=2, help="loads of each way; the fastest kept")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return

    from ktray.models import create_backbone, save_model
    from ktray.models.heads import TaskModel

    work = tempfile.mkdtemp(prefix="ktray-load-")
    try:
        rows = []
        for arch in args.archs.split(","):
            path = os.path.join(work, arch)
            save_model(TaskModel(create_backbone(arch, pretrained=False), 10), path)
            for way in ("plain", "ktray"):
                runs = []
                for _ in range(args.repeat):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", way, path],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
                    runs.append(json.loads(line[len("RESULT ") :]))
                rows.append((arch, way, min(runs, key=lambda r: r["total_s"])))
            shutil.rmtree(path)
        print(
            f"\n{'model':24s} {'way':34s} {'load s':>7s} {'+read s':>8s} {'peak GiB':>9s} "
            f"{'vs plain':>8s}"
        )
        plain = {}
        for arch, way, r in rows:
            name = "plain (init + load_state_dict)" if way == "plain" else "ktray load_model"
            plain.setdefault(arch, r["total_s"])
            print(
                f"{arch:24s} {name:34s} {r['load_s']:7.2f} {r['total_s']:8.2f} "
                f"{r['peak_gib']:9.2f} {r['total_s'] / plain[arch]:8.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
