"""What the parts of ``benchmarks/gpu_check.py`` share: its settings (from the environment
``benchmarks/gpu_check.sh`` sets), the result rows, the made-once data folders, the teacher
checkpoints and the config every Ray part starts from."""

from __future__ import annotations

import json
import os
import shutil

OUT = os.environ.get("GPU_CHECK_OUT", "/tmp/ktray-gpu-check")
IMAGES = int(os.environ.get("GPU_CHECK_IMAGES", "20000"))
SECONDS = float(os.environ.get("GPU_CHECK_SECONDS", "8"))  # each bare baseline's timed loop
RESULTS = os.environ.get("GPU_CHECK_RESULTS", os.path.join(OUT, "results.jsonl"))
GPUS = max(1, int(os.environ.get("GPU_CHECK_GPUS", "1")))  # model actors of a pass
UNIQUE = 4000
SIZE = 224
MODELS = {"vit_b": "vit_base_patch16_224", "vit_l": "vit_large_patch16_224"}
STUDENT = "fastvit_s12"
if os.environ.get("GPU_CHECK_DRY"):  # rehearse the orchestration on a CPU machine, tiny models
    MODELS = {"vit_b": "test_vit", "vit_l": "test_vit"}
    STUDENT = "test_resnet"


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
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def made_at_this_size(folder: str) -> bool:
    """Whether ``folder`` was made before for IMAGES images; if not, it is removed (made
    again: another size's data must not be reused)."""
    done = os.path.join(folder, "done")
    if os.path.exists(done):
        with open(done) as f:
            if f.read().strip() == str(IMAGES):
                return True
    shutil.rmtree(folder, ignore_errors=True)
    return False


def mark_made(folder: str) -> None:
    with open(os.path.join(folder, "done"), "w") as f:
        f.write(str(IMAGES))


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
