"""`ktray report` and sweeps on a segmentation run: test mIoU instead of test accuracy."""

import json
import os

import pytest

from ktray.config import load_config
from ktray.errors import KtrayError
from ktray.pipeline import accounting, sweeps


def _manifest(root, rel, **fields):
    d = os.path.join(root, rel)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(fields, f)


def test_compute_report_of_a_segmentation_run_uses_test_miou(tmp_path):
    root = str(tmp_path / "out")
    _manifest(root, "teacher", stage="teacher", test_miou=0.61, flops=4e12, train_seconds=5.0)
    _manifest(root, "logits/in_domain", stage="logits", name="in_domain", images=100, flops=1e12)
    _manifest(root, "distill/task@in_domain", stage="distill", name="task@in_domain", flops=2e12)
    for name, miou in (("task@in_domain", 0.5), ("scratch", 0.3)):
        _manifest(root, f"finetune/{name}", stage="finetune", name=name, test_miou=miou, flops=1e9)
    r = accounting.write_report(root)
    assert r["metric"] == "test_miou"
    rows = {(row["stage"], row["name"]): row for row in r["rows"]}
    assert rows[("finetune", "task@in_domain")]["test_miou"] == 0.5
    assert rows[("finetune", "task@in_domain")]["pretrain_flops"] == pytest.approx(3e12)
    md = open(r["outputs"]["md"]).read()
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert "test_miou" in header and "test_accuracy" not in header
    assert "| 0.5000 |" in md and "test mIoU against pretraining compute" in md
    # the plot's y values and reference lines are the mIoUs (a classification run: accuracy)
    seen = {}
    real = accounting.plot_accuracy

    def spy(points, x, **kw):
        seen.update(kw, ys=[p[kw["metric"]] for p in points])
        return real(points, x, **kw)

    accounting.plot_accuracy = spy
    try:
        accounting.write_report(root)
    finally:
        accounting.plot_accuracy = real
    assert seen["metric"] == "test_miou" and seen["ys"] == [0.5]
    assert seen["hlines"] == {"scratch": 0.3, "teacher": 0.61}
    assert accounting.report_metric([{"test_accuracy": 0.9, "test_miou": None}]) == "test_accuracy"


def test_sweep_metric_must_be_one_the_task_reports(tmp_path):
    def cfg(kind, metric):
        return load_config(None, [f"data.kind={kind}", f"sweep.metric={metric}", f"out={tmp_path}"])

    sweeps.check_metric(cfg("segfolder", "test_miou"))
    sweeps.check_metric(cfg("fashion_mnist", "test_accuracy"))
    assert sweeps.task_metric(cfg("segparquet", "test_miou")) == "test_miou"
    with pytest.raises(KtrayError, match="segmentation task: its trials report test_miou"):
        sweeps.check_metric(cfg("segfolder", "test_accuracy"))
    with pytest.raises(KtrayError, match="test_miou is a segmentation metric"):
        sweeps.check_metric(cfg("fashion_mnist", "test_miou"))


def test_sweep_results_of_a_segmentation_sweep_rank_and_plot_test_miou(tmp_path):
    """A segmentation sweep's trials report test_miou: the table, the best trial and every plot
    use it (the trials' rows carry no test_accuracy)."""
    from ktray.pipeline import sweep_results

    cfg = load_config(
        None,
        [
            "data.kind=segfolder",
            "sweep.metric=test_miou",
            f"out={tmp_path}/out",
            "sweep.params={distill.temperature: [1,2]}",
        ],
    )
    rows = [
        {
            "trial": f"t{t}",
            "status": "done",
            "distill.temperature": float(t),
            "test_miou": miou,
            "transfer_images": 100 * t,
            "pretrain_flops": 1e12 * t,
        }
        for t, miou in ((1, 0.42), (2, 0.37))
    ]
    seen = []
    real = accounting.plot_accuracy

    def spy(points, x, **kw):
        seen.append((x, kw["metric"], [p[kw["metric"]] for p in points if p.get(x) is not None]))
        return real(points, x, **kw)

    accounting.plot_accuracy = spy
    try:
        params = [sweeps.Param("distill.temperature", "grid", [1.0, 2.0])]
        paths, best = sweep_results.write_sweep_results(cfg, rows, params)
    finally:
        accounting.plot_accuracy = real
    assert best["trial"] == "t1"
    assert {"transfer_png", "compute_png", "params_png"} <= set(paths)
    assert [s[1] for s in seen] == ["test_miou"] * 3
    assert all(sorted(s[2]) == [0.37, 0.42] for s in seen)
