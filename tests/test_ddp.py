"""Ray Train with two gloo DDP workers: distillation runs data-parallel and the ranks end with
identical parameters (each rank's are dumped by tests/ddp_probe.py after every step)."""

import os

import pytest
import torch

from ktray.config import load_config
from ktray.models import load_model
from ktray.stages import distill as distill_stage
from ktray.stages import logits as logits_stage
from ktray.stages import teacher as teacher_stage

# two Ray Train workers start in ~30 s on a quiet 2-core machine; far longer on a busy one
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def ray_with_probe(tmp_path, ray_local):
    """A local Ray whose workers dump their parameters per rank (a fresh Ray: the hook is a
    job-level runtime_env); shut down afterwards."""
    import ddp_probe
    import ray
    from conftest import start_ray

    probe = tmp_path / "ranks"
    probe.mkdir()
    ray.shutdown()
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    start_ray(
        runtime_env={
            "env_vars": {"PYTHONPATH": path, ddp_probe.ENV: str(probe)},
            "worker_process_setup_hook": "ddp_probe.install",
        },
    )
    try:
        yield probe
    finally:
        ray.shutdown()
        start_ray()  # the session's plain Ray again, for the tests after this one


def test_distill_with_two_ddp_workers_keeps_ranks_in_sync(tiny_task, tmp_path, ray_with_probe):
    out = str(tmp_path / "out")
    args = [
        f"data.root={tiny_task}",
        f"out={out}",
        "distill.steps=3",
        "distill.batch_size=8",
        "distill.lr=0.01",
        "data.generic_images=0",
    ]
    # teacher and logits in local mode (reused below): only distillation pays for two workers
    teacher_stage.run(load_config("tiny", args))
    logits_stage.run(load_config("tiny", args), "in_domain")
    m = distill_stage.run(load_config("tiny", args + ["ray.num_workers=2"]), "in_domain", "task")
    assert m["steps"] == 3
    # distill.batch_size is global: two workers x 4 images per step (not twice the images)
    assert m["images_seen"] == 3 * 8
    ranks = [torch.load(ray_with_probe / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for i, (a, b) in enumerate(zip(*ranks)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=f"parameter {i}")
    # the probe saw the student that was saved: every saved weight is among rank 0's final ones
    model, spec = load_model(m["outputs"]["model"])
    assert spec["num_classes"] == 3
    for name, w in model.named_parameters():
        assert any(p.shape == w.shape and torch.equal(p, w.detach()) for p in ranks[0]), name
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
