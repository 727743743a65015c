"""Seeds and spreads: ``seeds=N`` replicates of every student method, their mean / standard
deviation, the tie rule, replicate output names, and one end-to-end run with two seeds."""

import json
import os
import statistics

import pytest

from ktray.config import config_hash, load_config
from ktray.errors import KtrayError
from ktray.pipeline import manifest, replicates, reporting
from ktray.train.specs import DistillSpec, FinetuneSpec, TeacherSpec


def _entry(acc, pre=None, seconds=10.0, **more):
    e = {"init": "random", "finetune_steps": 4, "test_accuracy": acc, "train_seconds": seconds}
    if pre is not None:
        e["distill_test_accuracy"] = pre
    return {**e, **more}


def test_aggregate_mean_sample_std_and_per_seed_entries():
    runs = [
        (0, _entry(0.5, pre=0.4, seconds=10.0, per_class_iou=[0.2, 0.4]), "/o/ft/x/model"),
        (1, _entry(0.7, pre=0.6, seconds=20.0, per_class_iou=[0.4, 0.8]), "/o/ft/x~seed1/model"),
        (2, _entry(0.9, pre=0.5, seconds=30.0, per_class_iou=[0.6, 0.6]), "/o/ft/x~seed2/model"),
    ]
    m = replicates.aggregate(runs)
    assert m["n_seeds"] == 3
    assert m["test_accuracy"] == pytest.approx(0.7)
    assert m["test_accuracy_std"] == pytest.approx(0.2)  # ddof=1 (ddof=0 gives 0.163)
    assert m["test_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert m["distill_test_accuracy"] == pytest.approx(0.5)
    assert m["distill_test_accuracy_std"] == pytest.approx(0.1)
    assert m["train_seconds"] == pytest.approx(20.0)
    assert m["per_class_iou"] == pytest.approx([0.4, 0.6])
    # what every seed shares stays as it is (an int stays an int)
    assert m["finetune_steps"] == 4 and isinstance(m["finetune_steps"], int)
    assert m["init"] == "random"
    assert [s["seed"] for s in m["seeds"]] == [0, 1, 2]
    assert [s["test_accuracy"] for s in m["seeds"]] == [0.5, 0.7, 0.9]
    assert [s["distill_test_accuracy"] for s in m["seeds"]] == [0.4, 0.6, 0.5]
    assert m["seeds"][1]["model"] == "/o/ft/x~seed1/model"


def test_one_seed_keeps_todays_entry_plus_n_seeds():
    e = _entry(0.61, pre=0.5)
    assert replicates.aggregate([(0, e, "/m")]) == {**e, "n_seeds": 1}
    with pytest.raises(ValueError):
        replicates.aggregate([])


def _results(**methods):
    return {"task": "t", "methods": methods}


def _m(mean, sd, n=3):
    return {"test_accuracy": mean, "test_accuracy_std": sd, "n_seeds": n}


def test_tie_rule_both_ways():
    # spread = sqrt(0.02^2 + 0.02^2) = 0.0283
    tie = replicates.compare(_results(scratch=_m(0.58, 0.02), **{"init@imagenet": _m(0.60, 0.02)}))
    assert [(c["a"], c["b"], c["verdict"]) for c in tie] == [("init@imagenet", "scratch", "tie")]
    assert tie[0]["spread"] == pytest.approx(0.02 * 2**0.5)
    assert tie[0]["diff"] == pytest.approx(0.02)
    win = replicates.compare(_results(scratch=_m(0.58, 0.02), **{"init@imagenet": _m(0.65, 0.02)}))
    assert win[0]["verdict"] == "beats" and win[0]["a"] == "init@imagenet"
    assert win[0]["diff"] == pytest.approx(0.07)
    # the better one is named first, whichever side of the pair it is on
    lose = replicates.compare(_results(scratch=_m(0.70, 0.01), **{"init@imagenet": _m(0.60, 0.01)}))
    assert (lose[0]["a"], lose[0]["b"], lose[0]["verdict"]) == ("scratch", "init@imagenet", "beats")
    assert lose[0]["diff"] == pytest.approx(0.10)


def test_pairs_task_vs_features_and_best_student_vs_teacher():
    r = _results(
        teacher={"test_accuracy": 0.70, "n_seeds": 1},
        scratch=_m(0.60, 0.01),
        **{"features@in_domain": _m(0.74, 0.01), "task@in_domain": _m(0.75, 0.01)},
    )
    calls = {(c["a"], c["b"]): c["verdict"] for c in replicates.compare(r)}
    assert calls[("features@in_domain", "scratch")] == "beats"
    assert calls[("task@in_domain", "scratch")] == "beats"
    assert calls[("task@in_domain", "features@in_domain")] == "tie"  # 0.01 <= 0.0141
    # the teacher ran once (sd 0): the spread is the student's alone, 0.01 < 0.05
    assert calls[("task@in_domain", "teacher")] == "beats"
    lines = replicates.summary(r)
    assert "sqrt(sd_a^2 + sd_b^2)" in lines[0]
    assert "task@in_domain and features@in_domain tie" in "\n".join(lines)
    assert "task@in_domain beats teacher by 0.0500" in "\n".join(lines)


def test_one_seed_calls_nothing():
    r = _results(scratch={"test_accuracy": 0.6, "n_seeds": 1}, **{"task@x": {"test_accuracy": 0.7}})
    assert {c["verdict"] for c in replicates.compare(r)} == {"unknown"}
    (line,) = replicates.summary(r)
    assert "no spread is known" in line


def _table_results(n):
    sd = 0.004 if n > 1 else None
    m = {"test_accuracy": 0.755, "n_seeds": n, "train_seconds": 1.0, "pretrain_flops": 0}
    s = {"test_accuracy": 0.6, "n_seeds": n, "train_seconds": 1.0, "pretrain_flops": 0}
    if n > 1:
        m.update(test_accuracy_std=sd, seeds=[{"seed": 0}, {"seed": 1}])
        s.update(test_accuracy_std=0.01, seeds=[{"seed": 0}, {"seed": 1}])
    return {"task": "t", "test_images": 10, "methods": {"scratch": s, "task@in_domain": m}}


def test_table_markdown_and_plot_show_the_spread():
    r = _table_results(2)
    table = reporting.format_table(r)
    assert "0.7550 ± 0.0040" in table and "mean ± sd, 2 seeds" in table
    assert "task@in_domain beats scratch by 0.1550" in table
    md = reporting.markdown(r)
    assert "| task@in_domain | 0.7550 ± 0.0040 |" in md and "not a significance test" in md
    assert reporting.plot(r)[:4] == b"\x89PNG"
    one = reporting.format_table(_table_results(1))
    assert "±" not in one and "0.7550" in one and "no spread is known" in one


def test_replicate_names_and_their_folders():
    assert replicates.stage_name("scratch", 0) == "scratch"
    assert replicates.stage_name("task@in_domain", 2) == "task@in_domain~seed2"
    assert replicates.stage_name("", 3) == ""
    for name in ("scratch~seed1", "task@in_domain+init@imagenet~seed12"):
        assert replicates.split_name(name) == (name.split("~")[0], int(name.rsplit("d", 1)[1]))
        assert manifest.path_name(name) == name  # a readable folder, not a hash
    assert replicates.split_name("init@/ckpt/model-seed1") == ("init@/ckpt/model-seed1", 0)
    assert manifest.stage_dir("/o", "finetune", "scratch~seed1") == "/o/finetune/scratch~seed1"
    assert replicates.train_seeds(5, 3) == [5, 6, 7]


def test_train_seed_moves_the_students_only(tmp_path):
    base = load_config("tiny", [f"out={tmp_path}"])
    rep = load_config("tiny", [f"out={tmp_path}", "train.seed=1", "data.seed=3"])
    assert FinetuneSpec.from_config(rep, scratch=True).seed == 4
    assert DistillSpec.from_config(rep).seed == 4
    assert TeacherSpec.from_config(rep, 24).seed == 3  # the teacher: data.seed alone
    t0 = load_config("tiny", [f"out={tmp_path}", "train.seed=1"])
    assert config_hash(TeacherSpec.from_config(t0, 24)) == config_hash(
        TeacherSpec.from_config(base, 24)
    )
    assert config_hash(FinetuneSpec.from_config(t0, True)) != config_hash(
        FinetuneSpec.from_config(base, True)
    )
    with pytest.raises(KtrayError, match="seeds"):
        load_config("tiny", ["seeds=0"])


def test_estimate_counts_every_seed(tmp_path):
    from ktray.pipeline.estimate import Costs, plan

    rows = {"train": 24, "test": 12, "unlabeled": 24}
    costs = Costs(1e-3, 2e-3, 1e-4, "cpu")
    one = dict(plan(load_config("tiny", [f"out={tmp_path}"]), rows, costs))
    three = dict(plan(load_config("tiny", [f"out={tmp_path}", "seeds=3"]), rows, costs))
    assert three["teacher (adapt + test)"] == one["teacher (adapt + test)"]
    assert three["logits[in_domain]"] == one["logits[in_domain]"]
    assert three["finetune[scratch] x3 seeds"] == pytest.approx(3 * one["finetune[scratch]"])
    assert three["distill[task@in_domain] x3 seeds"] == pytest.approx(
        3 * one["distill[task@in_domain]"]
    )


def _manifest(out, *parts):
    with open(os.path.join(out, *parts, "manifest.json")) as f:
        return json.load(f)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.mark.slow
def test_two_seeds_end_to_end(tiny_task, tmp_path, ray_local, capsys):
    from ktray import cli

    out = str(tmp_path / "out")
    args = ["run", "tiny", f"data.root={tiny_task}", f"out={out}", "seeds=2"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    results = json.load(open(os.path.join(out, "results.json")))
    methods = results["methods"]
    # one teacher, one logits pass; a finetune (and distill) output per method and seed
    assert sorted(os.listdir(os.path.join(out, "logits"))) == ["in_domain"]
    assert _manifest(out, "teacher")["stage"] == "teacher" and methods["teacher"]["n_seeds"] == 1
    assert not [d for d in os.listdir(out) if d.startswith("teacher") and d != "teacher"]
    finetunes = {d for d in os.listdir(os.path.join(out, "finetune")) if not d.startswith(".")}
    assert finetunes == {"scratch", "scratch~seed1", "task@in_domain", "task@in_domain~seed1"}
    assert sorted(os.listdir(os.path.join(out, "distill"))) == [
        "task@in_domain",
        "task@in_domain~seed1",
    ]

    # the teacher and the logits pass were written before the first student and never again
    def at(*parts):
        return os.path.getmtime(os.path.join(out, *parts, "manifest.json"))

    first = min(at("finetune", "scratch"), at("distill", "task@in_domain"))
    assert at("teacher") < first and at("logits", "in_domain") < at("distill", "task@in_domain")
    assert _manifest(out, "distill", "task@in_domain~seed1")["name"] == "task@in_domain~seed1"

    for method in ("scratch", "task@in_domain"):
        m = methods[method]
        dirs = [method, f"{method}~seed1"]
        accs = [_manifest(out, "finetune", d)["test_accuracy"] for d in dirs]
        assert m["n_seeds"] == 2 and [s["seed"] for s in m["seeds"]] == [0, 1]
        assert [s["test_accuracy"] for s in m["seeds"]] == accs
        assert m["test_accuracy"] == pytest.approx(statistics.mean(accs))
        assert m["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        # the seed really changes training: different weights, recorded in model.json
        models = [os.path.join(out, "finetune", d, "model") for d in dirs]
        assert [s["model"] for s in m["seeds"]] == models
        assert results["models"][method] == models[0]  # exports / MLflow: the first seed's
        w0, w1 = (_weights(p) for p in models)
        assert any(not (w0[k] == w1[k]).all() for k in w0)
        seeds = [json.load(open(os.path.join(p, "model.json")))["train"]["seed"] for p in models]
        assert seeds == [0, 1]
    distills = ("task@in_domain", "task@in_domain~seed1")
    pre = [_manifest(out, "distill", d)["test_accuracy"] for d in distills]
    assert methods["task@in_domain"]["distill_test_accuracy"] == pytest.approx(statistics.mean(pre))
    w0, w1 = (_weights(os.path.join(out, "distill", d, "model")) for d in distills)
    assert any(not (w0[k] == w1[k]).all() for k in w0)
    assert "±" in printed and "sqrt(sd_a^2 + sd_b^2)" in printed
    assert "±" in open(os.path.join(out, "results.md")).read()
    calls = [{c["a"], c["b"]} for c in results["comparisons"]]
    assert {"task@in_domain", "scratch"} in calls and any("teacher" in c for c in calls)
    assert all(c["verdict"] in ("beats", "tie") for c in results["comparisons"])

    # the compute report prices each replicate's pretraining: its own distillation + the logits
    from ktray.pipeline import accounting

    rows = {(r["stage"], r["name"]): r for r in accounting.gather(out) if r["run"] == "."}
    logits_flops = _manifest(out, "logits", "in_domain")["flops"]
    for d in distills:
        assert rows[("finetune", d)]["pretrain_flops"] == pytest.approx(
            _manifest(out, "distill", d)["flops"] + logits_flops
        )
    assert rows[("finetune", "scratch~seed1")]["pretrain_flops"] == 0.0

    # a rerun with a third seed reuses the two finished replicates and trains the third
    def stamp(d):
        return os.path.getmtime(os.path.join(out, "finetune", d, "manifest.json"))

    before = [stamp("scratch"), stamp("scratch~seed1")]
    args = ["run", "tiny", f"data.root={tiny_task}", f"out={out}", "seeds=3", "methods=[scratch]"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert [stamp("scratch"), stamp("scratch~seed1")] == before
    again = json.load(open(os.path.join(out, "results.json")))["methods"]["scratch"]
    assert again["n_seeds"] == 3 and [s["seed"] for s in again["seeds"]] == [0, 1, 2]
    accs = [s["test_accuracy"] for s in again["seeds"]]
    assert accs[:2] == [s["test_accuracy"] for s in methods["scratch"]["seeds"]]
    assert accs[2] == _manifest(out, "finetune", "scratch~seed2")["test_accuracy"]


def test_segmentation_table_shows_the_spread():
    from ktray.pipeline import seg_report

    runs = [
        (s, {"test_miou": v, "test_pixel_accuracy": p, "per_class_iou": [v, p]}, f"/m{s}")
        for s, v, p in ((0, 0.40, 0.80), (1, 0.50, 0.90))
    ]
    r = {
        "task": "seg",
        "task_type": "segmentation",
        "num_classes": 2,
        "methods": {"scratch": replicates.aggregate(runs)},
    }
    m = r["methods"]["scratch"]
    assert m["test_miou"] == pytest.approx(0.45) and m["per_class_iou"] == pytest.approx(
        [0.45, 0.85]
    )
    assert m["test_miou_std"] == pytest.approx(statistics.stdev([0.40, 0.50]))
    assert "0.4500 ± 0.0707" in seg_report.format_table(r)
    assert "0.8500 ± 0.0707" in seg_report.markdown(r)


def test_mlflow_logs_mean_sd_and_every_seed(tmp_path):
    import mlflow

    from ktray.pipeline.tracking import log_pipeline, tracking_uri

    cfg = load_config("tiny", [f"out={tmp_path}", "tracking.mlflow=true", "seeds=2"])
    runs = [(s, _entry(a), f"/m{s}") for s, a in ((0, 0.5), (1, 0.7))]
    results = {"task": "t", "methods": {"scratch": replicates.aggregate(runs)}}
    parent = log_pipeline(cfg, results, {}, {})
    client = mlflow.MlflowClient(tracking_uri(cfg))
    exp = client.get_run(parent).info.experiment_id
    (child,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert child.data.metrics["test_accuracy"] == pytest.approx(0.6)
    assert child.data.metrics["test_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert child.data.metrics["n_seeds"] == 2
    history = client.get_metric_history(child.info.run_id, "seed/test_accuracy")
    assert [(h.step, h.value) for h in sorted(history, key=lambda h: h.step)] == [
        (0, 0.5),
        (1, 0.7),
    ]
