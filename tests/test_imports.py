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
    from ktray.data.row_ranges import ReadDecodeRanges, row_ranges

    img = tmp_path / "a.jpg"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(img)
    table = tmp_path / "views.parquet"
    pq.write_table(pa.table({"source": [str(img)] * 3, "logits": [[0.5, 1.0]] * 3}), table)
    task = ReadDecodeRanges(["source", "logits"], DecodeViews({"x": 8}, ["logits"]), 2)
    payload = pickle.dumps((task, pa.Table.from_pylist(row_ranges([str(table)], 4))))
    code = (
        "import pickle, sys\n"
        f"task, ranges = pickle.loads({payload!r})\n"
        "out = list(task(ranges))\n"
        "assert [o['x'].shape for o in out] == [(2, 8, 8, 3), (1, 8, 8, 3)], out\n"
        "assert 'torch' not in sys.modules, 'the decode task imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
