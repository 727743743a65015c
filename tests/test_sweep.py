"""`ktray sweep`: a 2-trial Ray Tune sweep on the tiny task, and the sweep spec's checks."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ktray import cli
from ktray.config import load_config
from ktray.errors import KtrayError
from ktray.pipeline import accounting, sweeps

SWEEPS = sorted(
    (Path(__file__).resolve().parents[1] / "ktray" / "configs" / "sweeps").glob("*.yaml")
)


def test_tiny_sweep_table_plots_mlflow_and_shared_teacher(tiny_task, tmp_path, ray_local, capsys):
    out = str(tmp_path / "out")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        cli.main(
            [
                "sweep",
                "sweeps/tiny",
                f"data.root={tiny_task}",
                f"out={out}",
                "tracking.mlflow=true",
                f"tracking.tracking_uri={uri}",
            ]
        )
        == 0
    )
    assert "data.unlabeled_limit" in capsys.readouterr().out
    sweep = os.path.join(out, "sweep")
    table = pq.read_table(os.path.join(sweep, "results.parquet")).to_pylist()
    assert len(table) == 2
    assert sorted(r["data.unlabeled_limit"] for r in table) == [8, 16]
    for r in table:
        assert r["status"] == "done" and 0.0 <= r["test_accuracy"] <= 1.0
        assert r["transfer_images"] == r["data.unlabeled_limit"]
        assert r["pretrain_flops"] > 0
    for name in (
        "accuracy_vs_transfer_size.png",
        "accuracy_vs_compute.png",
        "accuracy_vs_params.png",
    ):
        assert open(os.path.join(sweep, name), "rb").read(4) == b"\x89PNG"
    assert "| data.unlabeled_limit |" in open(os.path.join(sweep, "results.md")).read()
    m = json.load(open(os.path.join(sweep, "manifest.json")))
    assert m["finished"] == 2 and m["flops"] > 0 and m["device_seconds"] > 0

    # one teacher, trained once and adopted by both trials; its FLOPs reach the trials' logits
    assert os.path.exists(os.path.join(sweep, "shared", "teacher", "model", "model.json"))
    for r in table:
        assert not os.path.exists(os.path.join(r["trial_dir"], "teacher"))
        logits = json.load(
            open(os.path.join(r["trial_dir"], "logits", "in_domain", "manifest.json"))
        )
        assert logits["images"] == r["data.unlabeled_limit"]
        if logits.get("sliced_from"):  # taken from the largest set: computed once, there
            source = json.load(open(os.path.join(logits["sliced_from"], "manifest.json")))
            assert logits["flops"] == 0 and source["flops"] > 0
            assert 0 < logits["attributed_flops"] <= source["flops"]
        else:
            assert logits["flops"] > 0
        assert r["pretrain_flops"] > logits.get("attributed_flops", logits["flops"])

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["ktray"])
    parents = runs[runs["tags.ktray.kind"] == "sweep"]
    assert len(parents) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]]
    assert len(children) == 2
    assert sorted(children["params.data.unlabeled_limit"]) == ["16", "8"]
    # the epoch reports reached Tune: each child has the training curve by pipeline step
    history = mlflow.MlflowClient().get_metric_history(children.run_id.iloc[0], "loss")
    steps = [h.step for h in history]
    assert steps and max(steps) == 8  # distill.steps + finetune.steps

    # the compute report sees every trial's stages; the shared teacher counts once
    report = accounting.write_report(out)
    rows = report["rows"]
    finetuned = [r for r in rows if r["stage"] == "finetune"]
    assert len(finetuned) == 2 and all(r["pretrain_flops"] > 0 for r in finetuned)
    assert {r["params"] for r in finetuned} == {"data.unlabeled_limit=8", "data.unlabeled_limit=16"}
    assert len([r for r in rows if r["stage"] == "teacher"]) == 1
    assert os.path.exists(os.path.join(out, "report", "accuracy_vs_compute.png"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sweep.params.distill.temprature=[1,2]"], "did you mean 'distill.temperature'"),
        (["sweep.params={out: [a, b]}"], "'out' cannot be swept"),
        (["sweep.params={student.arch: {uniform: [1, 2]}}"], "needs a numeric field"),
        (["sweep.params={distill.temperature: 3}"], "give a list of values"),
        (["sweep.params={distill: [1, 2]}"], "is a section"),
        (
            ["sweep.params={student.arch: [test_resnet, resnet_999]}"],
            "student.arch: unknown model 'resnet_999'",
        ),
        (["sweep.metric=accuracy"], "sweep.metric must be one of test_accuracy"),
        (["sweep.method=magic@in_domain"], "unknown objective 'magic'"),
    ],
)
def test_bad_sweep_is_one_line_error_before_ray(tiny_task, tmp_path, capsys, overrides, message):
    import ray

    was = ray.is_initialized()
    args = ["sweep", "sweeps/tiny", f"data.root={tiny_task}", f"out={tmp_path}/o"] + overrides
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("ktray: error:"), err
    assert len([line for line in err if line.startswith("ktray: error")]) == 1
    assert ray.is_initialized() == was
    assert not os.path.exists(os.path.join(tmp_path, "o", "sweep", "shared"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_config_parses(path, monkeypatch):
    monkeypatch.setattr(sweeps, "check_config", lambda cfg: None)  # no dataset needed
    cfg = load_config(str(path))
    params = sweeps.parse(cfg)
    assert params and all(p.key in cfg.sweep.params or "." in p.key for p in params)


def test_spec_forms_sharing_rules_and_trial_names(monkeypatch):
    monkeypatch.setattr(sweeps, "check_config", lambda cfg: None)
    cfg = load_config(
        "tiny",
        [
            "sweep.params={distill: {temperature: [1, 4]}, "
            "distill.lr: {loguniform: [0.0001, 0.01]}, "
            "distill.steps: {uniform: [2, 9]}, "
            "curate.scales: {choice: [[0.6], [0.4, 0.8]]}}"
        ],
    )
    params = {p.key: p for p in sweeps.parse(cfg)}
    assert params["distill.temperature"].kind == "grid"
    assert params["distill.lr"].kind == "loguniform" and not params["distill.lr"].integer
    assert params["distill.steps"].integer
    assert params["curate.scales"].values == [[0.6], [0.4, 0.8]]
    # distill/curate keys only (method task@in_domain): teacher, data and logits are shared
    assert sweeps.shared_stages(cfg, list(params.values())) == {
        "data": True,
        "teacher": True,
        "curate": False,
        "logits": "in_domain",
    }
    unl = [sweeps.Param("data.unlabeled_limit", "grid", [8, 16])]
    assert sweeps.shared_stages(cfg, unl) == {
        "data": False,
        "teacher": True,
        "curate": False,
        "logits": "",
    }
    labels = [sweeps.Param("data.labels_per_class", "grid", [5, 10])]
    assert not sweeps.shared_stages(cfg, labels)["teacher"]
    assert sweeps.trial_name({"a.b": 1}) == sweeps.trial_name({"a.b": 1})
    assert sweeps.trial_name({"a.b": 1}) != sweeps.trial_name({"a.b": 2})
    with pytest.raises(KtrayError, match="lo < hi"):
        sweeps.parse(load_config("tiny", ["sweep.params={distill.lr: {uniform: [2, 1]}}"]))
    with pytest.raises(KtrayError, match="sweep.params is empty"):
        sweeps.parse(load_config("tiny"))
    asha = load_config("tiny", ["sweep.scheduler=asha", "distill.steps=40", "finetune.steps=20"])
    assert sweeps.asha_limits(asha) == (15, 61)
