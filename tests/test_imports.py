"""The library never imports ray; only ktray.stages and ktray.cli orchestrate with it."""

import subprocess
import sys

LIBRARY = ["ktray.config", "ktray.io", "ktray.manifest", "ktray.data", "ktray.models",
           "ktray.losses", "ktray.distill", "ktray.metrics", "ktray.train.loop",
           "ktray.train.worker", "ktray.predict", "ktray.evaluation", "ktray.report",
           "ktray.tracking", "ktray.retrieval", "ktray.tasks", "ktray.validate", "ktray.compute",
           "ktray.sweep_spec", "ktray.curation", "ktray.retrieval.embed",
           "ktray.retrieval.report"]


def test_library_modules_import_without_ray():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIBRARY)
            + "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            + "assert not leaked, leaked\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_help_lists_every_stage():
    r = subprocess.run([sys.executable, "-m", "ktray.cli", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    for cmd in ("teacher", "logits", "distill", "finetune", "evaluate", "run", "demo", "sweep",
                "report"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "ktray.cli", "distill", "--help"],
                       capture_output=True, text=True)
    assert "--objective" in r.stdout and "--transfer" in r.stdout
