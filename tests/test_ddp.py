"""Ray Train with two gloo DDP workers: distillation runs data-parallel and stays in sync."""

import os

import torch

from ktray.config import load_config
from ktray.models import load_model
from ktray.stages import distill as distill_stage


def test_distill_with_two_ddp_workers(tiny_task, tmp_path, ray_local):
    out = str(tmp_path / "out")
    cfg = load_config("tiny", [f"data.root={tiny_task}", f"out={out}", "ray.num_workers=2",
                               "distill.steps=3", "distill.batch_size=8"])
    m = distill_stage.run(cfg, "in_domain", "task")
    assert m["steps"] == 3
    # two workers x 8 images per step: the global batch doubles
    assert m["images_seen"] == 3 * 8 * 2
    model, spec = load_model(m["outputs"]["model"])
    assert spec["num_classes"] == 3
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 3)
    assert os.path.exists(os.path.join(out, "distill", "task@in_domain", "manifest.json"))
