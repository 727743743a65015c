"""`ktray report`: gathering stage manifests (runs and sweep trials) into the compute table."""

import json
import os

import pyarrow.parquet as pq
import pytest

from ktray import cli
from ktray.pipeline import accounting


def _manifest(root, rel, **fields):
    d = os.path.join(root, rel)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(fields, f)


@pytest.fixture
def out(tmp_path):
    """A pipeline run plus a sweep whose trial links the shared logits (as `ktray sweep` does)."""
    root = str(tmp_path / "out")
    _manifest(root, "data", stage="data", config_hash="x")
    _manifest(
        root,
        "teacher",
        stage="teacher",
        name="",
        test_accuracy=0.9,
        flops=4e12,
        flops_per_image=1e9,
        device_seconds=100.0,
        train_seconds=50.0,
    )
    _manifest(
        root,
        "logits/in_domain",
        stage="logits",
        name="in_domain",
        images=1000,
        flops=1e12,
        device_seconds=20.0,
        seconds=25.0,
    )
    _manifest(
        root,
        "distill/task@in_domain",
        stage="distill",
        name="task@in_domain",
        flops=2e12,
        device_seconds=30.0,
        train_seconds=30.0,
        test_accuracy=0.6,
    )
    _manifest(
        root,
        "finetune/task@in_domain",
        stage="finetune",
        name="task@in_domain",
        test_accuracy=0.8,
        flops=1e11,
        device_seconds=5.0,
        train_seconds=5.0,
    )
    _manifest(
        root,
        "finetune/scratch",
        stage="finetune",
        name="scratch",
        test_accuracy=0.5,
        flops=1e11,
        device_seconds=5.0,
        train_seconds=5.0,
    )
    _manifest(root, "pipeline", stage="pipeline", seconds=300.0, flops=7.2e12)
    _manifest(
        root,
        "sweep/shared/logits/in_domain",
        stage="logits",
        name="in_domain",
        images=1000,
        flops=1e12,
        device_seconds=20.0,
        seconds=25.0,
    )
    trial = os.path.join(root, "sweep", "trial_abc")
    os.makedirs(os.path.join(trial, "logits"))
    os.symlink(
        os.path.join(root, "sweep/shared/logits/in_domain"),
        os.path.join(trial, "logits", "in_domain"),
    )
    _manifest(
        trial,
        "distill/task@in_domain",
        stage="distill",
        name="task@in_domain",
        flops=3e12,
        device_seconds=40.0,
        train_seconds=40.0,
    )
    _manifest(
        trial,
        "finetune/task@in_domain",
        stage="finetune",
        name="task@in_domain",
        test_accuracy=0.85,
        flops=1e11,
        device_seconds=5.0,
        train_seconds=5.0,
    )
    with open(os.path.join(trial, "trial.json"), "w") as f:
        json.dump({"params": {"distill.temperature": 4.0}}, f)
    _manifest(root, "ray/some-train-run", stage="bogus")  # Ray storage: skipped
    return root


def test_gather_pretraining_compute_and_shared_outputs(out):
    rows = accounting.gather(out)
    by = {(r["run"], r["stage"], r["name"]): r for r in rows}
    assert not [r for r in rows if r["stage"] == "bogus"]
    top = by[(".", "finetune", "task@in_domain")]
    assert top["pretrain_flops"] == pytest.approx(3e12)  # distill 2e12 + logits 1e12
    assert top["transfer_images"] == 1000 and top["test_accuracy"] == 0.8
    assert by[(".", "finetune", "scratch")]["pretrain_flops"] == 0.0
    assert by[(".", "teacher", "")]["seconds"] == 50.0
    trial = by[("sweep/trial_abc", "finetune", "task@in_domain")]
    assert trial["pretrain_flops"] == pytest.approx(4e12)  # its distill + the shared logits
    assert trial["params"] == "distill.temperature=4"
    assert by[("sweep/trial_abc", "logits", "in_domain")]["shared"] is True
    assert by[("sweep/shared", "logits", "in_domain")]["shared"] is False
    t = accounting.totals(rows)
    # every stage once: the trial's view of the shared logits and the pipeline aggregate excluded
    assert t["flops"] == pytest.approx(4e12 + 1e12 + 2e12 + 1e11 + 1e11 + 1e12 + 3e12 + 1e11)
    assert t["device_seconds"] == pytest.approx(100 + 20 + 30 + 5 + 5 + 20 + 40 + 5)


def test_report_command_writes_table_and_plot(out, capsys):
    assert cli.main(["report", out]) == 0
    assert "FLOPs" in capsys.readouterr().out
    report = os.path.join(out, "report")
    table = pq.read_table(os.path.join(report, "compute.parquet"))
    assert table.num_rows == 11
    assert set(table.column_names) >= {
        "run",
        "stage",
        "test_accuracy",
        "pretrain_flops",
        "flops",
        "device_seconds",
        "shared",
    }
    md = open(os.path.join(report, "compute.md")).read()
    assert "| sweep/trial_abc | finetune | task@in_domain | distill.temperature=4 |" in md
    assert open(os.path.join(report, "accuracy_vs_compute.png"), "rb").read(4) == b"\x89PNG"
    assert not [f for f in os.listdir(report) if ".tmp" in f]
    # a rerun replaces the report and does not read it back as a manifest
    assert cli.main(["report", out]) == 0
    assert pq.read_table(os.path.join(report, "compute.parquet")).num_rows == 11


def test_report_of_missing_or_empty_folder_is_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "output folder not found" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no stage manifests" in err and len(err.splitlines()) == 1
