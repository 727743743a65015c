"""Stage wiring: what a broken pipeline gets wrong while every stage still "works".

The colour task (tests/imagegen.py: the class is the image's colour) makes the right answers
known: a teacher learns it in a few steps, a student that fits the teacher's stored targets
scores ~1, an untrained student does not, and a target paired with its neighbour's row is
always another class. Each test here failed with its bug planted (tests/README.md).
"""

import json
import os

import pytest
import torch
from imagegen import make_colour_task

from ktray import cli
from ktray.config import load_config
from ktray.evaluation import evaluate_model_dir
from ktray.models import load_model
from ktray.stages import finetune as finetune_stage

# a module fixture trains several stages: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

# lr 1e-12: a finetune that cannot move the weights, so what it saves is what it started from.
TINY_LR = "1.0e-12"
COLOUR = [
    "methods=[teacher,scratch,task@in_domain]",
    "data.generic_images=0",
    "logits.views=1",  # one row per image: row i+1 always holds another class than row i
    "teacher.epochs=6",
    "distill.steps=16",
    "distill.lr=0.01",
    "finetune.steps=1",
    f"finetune.lr={TINY_LR}",
    "finetune.scratch_steps=1",
    f"finetune.scratch_lr={TINY_LR}",
]


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, ray_local):
    """`ktray run` on the colour task: teacher, an untrained scratch student (lr 1e-12) and
    task@in_domain (distilled at lr 0.01, then finetuned at lr 1e-12)."""
    base = tmp_path_factory.mktemp("colour")
    root = make_colour_task(str(base / "task"))
    out = str(base / "out")
    assert cli.main(["run", "tiny", f"data.root={root}", f"out={out}", *COLOUR]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return {"root": root, "out": out, "results": json.load(f)}


def _params(model_dir: str) -> dict[str, torch.Tensor]:
    model, _ = load_model(model_dir)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_finetune_starts_from_the_distilled_weights(colour_run):
    out = colour_run["out"]
    distilled = _params(os.path.join(out, "distill", "task@in_domain", "model"))
    finetuned = _params(os.path.join(out, "finetune", "task@in_domain", "model"))
    untrained = _params(os.path.join(out, "finetune", "scratch", "model"))  # the random init
    assert finetuned.keys() == distilled.keys()
    for name, tensor in distilled.items():
        torch.testing.assert_close(finetuned[name], tensor, rtol=0, atol=1e-6, msg=name)
    # distillation moved the weights, so a finetune from the random init would not match
    moved = max(float((distilled[k] - untrained[k]).abs().max()) for k in distilled)
    assert moved > 1e-3


def test_distilled_student_fits_the_targets_of_its_own_rows(colour_run):
    """Targets paired with a neighbour's row are always another colour's: a student trained
    on them scores ~0 on the test images, one trained on its own rows' targets ~1."""
    out = colour_run["out"]
    with open(os.path.join(out, "distill", "task@in_domain", "manifest.json")) as f:
        distill = json.load(f)
    assert distill["test_accuracy"] >= 0.9
    methods = colour_run["results"]["methods"]
    assert methods["task@in_domain"]["distill_test_accuracy"] == distill["test_accuracy"]


def test_methods_rank_as_the_task_dictates(colour_run):
    """Known answers: the teacher and the distilled student solve the colour task, the student
    that never trained (lr 1e-12) does not; every reported number is its model's accuracy."""
    out, results = colour_run["out"], colour_run["results"]
    m = results["methods"]
    assert m["teacher"]["test_accuracy"] >= 0.9
    assert m["task@in_domain"]["test_accuracy"] >= 0.9
    assert m["scratch"]["test_accuracy"] <= 0.5
    test_uri = os.path.join(out, "data", "test.parquet")
    for method, model_dir in results["models"].items():
        ev = evaluate_model_dir(model_dir, test_uri)
        assert ev["test_accuracy"] == pytest.approx(m[method]["test_accuracy"]), method
    assert results["models"]["task@in_domain"].endswith(
        os.path.join("finetune", "task@in_domain", "model")
    )


def test_stage_accuracy_is_measured_on_the_test_split(tmp_path, ray_local):
    """Test folder class c holds colour c+1: a student that learned the train split scores ~1
    on it and ~0 on the test split, so an accuracy taken on the wrong split is obvious."""
    root = make_colour_task(str(tmp_path / "task"), train=8, test=4, unlabeled=0, swap_test=True)
    os.rmdir(os.path.join(root, "unlabeled"))
    cfg = load_config(
        "tiny",
        [
            f"data.root={root}",
            f"out={tmp_path / 'out'}",
            "data.generic_images=0",
            "finetune.scratch_steps=12",
            "finetune.scratch_lr=0.01",
        ],
    )
    m = finetune_stage.run(cfg)
    data = os.path.join(str(tmp_path / "out"), "data")
    on_train = evaluate_model_dir(m["outputs"]["model"], os.path.join(data, "train.parquet"))
    assert on_train["test_accuracy"] >= 0.9  # it learned the train split
    assert m["test_accuracy"] <= 0.1
