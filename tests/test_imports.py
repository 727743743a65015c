"""The layers: core (no Config, no ray) < ktray.pipeline (Config, no ray) < ktray.stages (ray).

Modules are discovered, not listed, so a new module is checked the day it is added.
"""

import pkgutil
import subprocess
import sys

import pytest

import ktray

_FOUND = list(pkgutil.walk_packages(ktray.__path__, "ktray."))
ALL = sorted(m.name for m in _FOUND)
FILES = sorted(m.name for m in _FOUND if not m.ispkg)  # modules that are .py files
STAGES = [m for m in ALL if m.startswith("ktray.stages")]
PIPELINE = [m for m in ALL if m.startswith(("ktray.pipeline", "ktray.config"))]
CORE = [m for m in ALL if m not in STAGES + PIPELINE + ["ktray.cli"]]


def test_discovers_the_layers():
    assert "ktray.storage" in CORE and "ktray.train.worker" in CORE
    assert "ktray.pipeline.tasks" in PIPELINE and "ktray.stages.logits" in STAGES
    assert len(CORE) > 20 and len(PIPELINE) > 8


@pytest.mark.slow
def test_core_imports_neither_ray_nor_config():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = ('ray', 'ktray.config', 'ktray.pipeline', 'ktray.stages')\n"
        + "leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') "
        + "for b in bad))\nassert not leaked, leaked\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_pipeline_layer_imports_no_ray():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PIPELINE)
        + "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.') "
        + "or m.startswith('ktray.stages'))\nassert not leaked, leaked\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_help_lists_every_stage():
    r = subprocess.run(
        [sys.executable, "-m", "ktray.cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    for cmd in (
        "teacher",
        "logits",
        "distill",
        "finetune",
        "evaluate",
        "run",
        "demo",
        "sweep",
        "report",
    ):
        assert cmd in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ktray.cli", "distill", "--help"], capture_output=True, text=True
    )
    assert "--objective" in r.stdout and "--transfer" in r.stdout


def test_architecture_lists_every_module():
    """ARCHITECTURE.md names every module (one line each), so the map cannot drift."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    missing = [
        m
        for m in FILES
        if m.replace(".", "/")[len("ktray/") :] + ".py" not in listed
        and m.replace(".", "/") + ".py" not in text
    ]
    assert not missing, f"ARCHITECTURE.md does not list: {missing}"


def test_a_decode_task_never_imports_torch(tmp_path):
    """A Ray Data decode worker unpickles the distillation input's task (``ReadDecodeRanges``
    around ``DecodeViews``) and runs it: neither may import torch, which cost each fresh
    worker ~1.3 s of CPU and a few hundred MiB before its first row."""
    import pickle

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ktray.data.decode import DecodeViews
    from ktray.data.row_ranges import ReadDecodeRanges, call_items, row_ranges

    img = tmp_path / "a.jpg"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(img)
    table = tmp_path / "views.parquet"
    pq.write_table(pa.table({"source": [str(img)] * 3, "logits": [[0.5, 1.0]] * 3}), table)
    task = ReadDecodeRanges(["source", "logits"], DecodeViews({"x": 8}, ["logits"]), 2)
    calls = call_items(row_ranges([str(table)], 4), 1, 1, seed=0)
    payload = pickle.dumps((task, pa.Table.from_pylist(calls)))
    code = (
        "import pickle, sys\n"
        f"task, ranges = pickle.loads({payload!r})\n"
        "out = list(task(ranges))\n"
        "assert [o['x'].shape for o in out] == [(2, 8, 8, 3), (1, 8, 8, 3)], out\n"
        "assert 'torch' not in sys.modules, 'the decode task imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_inference_passes_decode_tasks_never_import_torch(tmp_path):
    """The CPU decode tasks of the logits, embedding, evaluation and prediction passes
    (``ktray.stages.decode_tasks``, pickled by reference: a decode worker imports the module)
    run without importing torch or faiss."""
    import numpy as np
    from PIL import Image

    img = tmp_path / "a.jpg"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(img)
    code = f"""
import sys
import pyarrow as pa
from ktray.stages import decode_tasks as d
from ktray.retrieval.crops import CropScheme
src = [{str(img)!r}, "/no/such/image.jpg"]
views = pa.table({{"image_id": ["a", "b"], "source": src, "view": [0, 0], "x0": [0.0, 0.0],
    "y0": [0.0, 0.0], "x1": [0.5, 1.0], "y1": [1.0, 1.0], "flip": [True, False],
    "set": ["s", "s"], "shard": [3, 3]}})
out = d.logits_views(views, 8)
assert out["pixels"].shape == (2, 8, 8, 3) and out["ok"].tolist() == [True, False], out
crops = pa.table({{"gallery_index": [0, 1], "image_id": ["a", "b"], "source": src,
    "set": ["g", "g"], "shard": [0, 0]}})
out = d.embedding_crops(crops, {{"g": CropScheme(grid=2).as_dict()}}, 8)
assert out["ok"].tolist() == [True] * 5 + [False], out["ok"]  # full + 2x2 grid, 1 unreadable
out = d.labeled_images(pa.table({{"source": src, "label": [1, 0]}}), 8)
assert out["label"].tolist() == [1, 0] and out["ok"].tolist() == [True, False]
out = d.full_images(views, 8)  # ktray predict: each image's own size rides along
assert out["width"].tolist() == [30, 0] and out["height"].tolist() == [40, 0], out
assert out["pixels"].shape == (2, 8, 8, 3) and out["ok"].tolist() == [True, False], out
leaked = [m for m in ("torch", "faiss") if m in sys.modules]
assert not leaked, leaked
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
