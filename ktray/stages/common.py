"""Ray plumbing shared by the stages: starting/joining Ray, Ray Train sessions and trainers."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable

import torch

from ktray import io
from ktray.config import Config, RayConfig

log = logging.getLogger("ktray")


def ensure_ray(rc: RayConfig) -> None:
    """Join the cluster named by ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = rc.address or os.environ.get("RAY_ADDRESS", "")
    kwargs = dict(log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=rc.num_cpus or None, include_dashboard=False, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def storage_path(cfg: Config) -> str:
    path = cfg.ray.storage_path or io.join(cfg.out, "ray")
    if not io.is_remote(path):
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
    return path


class RaySession:
    """A ktray training session inside a Ray Train worker (or Train V2 local mode)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else \
            torch.device("cpu")

    def prepare_model(self, model):
        import ray.train.torch

        if self.world_size == 1:
            return model.to(self.device)
        # Frozen teacher weights take no part in DDP's gradient all-reduce; the projector of the
        # task objective is unused there, hence find_unused_parameters.
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def prepare_loader(self, loader):
        import ray.train.torch

        if self.world_size == 1:
            return loader
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def report(self, metrics, state):
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                torch.save(state, os.path.join(d, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu",
                               weights_only=False)
        log.warning("resuming from a checkpoint at step %s", state.get("step"))
        return state


def fit(cfg: Config, name: str, worker: Callable[[dict], None], spec: dict) -> dict:
    """Run ``worker(spec)`` under a Ray Train ``TorchTrainer``; return its last metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    workers = cfg.ray.num_workers
    scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu)
    run_config = ray.train.RunConfig(
        name=name.replace("/", "-").replace("@", "-"),
        storage_path=storage_path(cfg),
        failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )
    trainer = TorchTrainer(worker, train_loop_config=spec, scaling_config=scaling,
                           run_config=run_config)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})
