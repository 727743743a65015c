"""Ray plumbing shared by the stages: starting/joining Ray, Ray Train sessions and trainers."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable

import torch

from ktray import storage
from ktray.config import Config, RayConfig
from ktray.stages.nodes import check_shared_storage

log = logging.getLogger("ktray")


def ensure_ray(rc: RayConfig) -> None:
    """Join the cluster named by ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        address = rc.address or os.environ.get("RAY_ADDRESS", "")
        kwargs = dict(log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **kwargs)
        else:
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner
            # polls for a worker-group run: without it the cleaner cannot work and logs "State
            # API may be temporarily unavailable" every second or so (19 lines in a 25-s run).
            # Local mode (num_workers=0) has no worker group and keeps the ~0.9 GiB it costs.
            # address="local": a new Ray, as documented. Plain ray.init() would join the last
            # cluster `ray start` left on this machine (a stale one failed with its token).
            ray.init(
                address="local",
                num_cpus=rc.num_cpus or None,
                include_dashboard=rc.num_workers > 0,
                **kwargs,
            )
    # per process: a sweep trial's process (already in Ray) gets quiet Ray Data too
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # ktray logs every pass's shards and ETA; Ray Data's own "execution finished in N s" line
    # repeats for every dataset it runs (each cached epoch of a distillation run).
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)


def worker_resources(cfg: Config) -> dict | None:
    """Resources of one Ray Train worker of a run that reads Ray Data datasets: None (Ray
    Train's default, 1 CPU) unless the cluster's CPUs less the workers' would leave less than
    ``train.decode_cpus`` to decoding; then the workers give up what one decode actor needs,
    or it never runs (2 workers on a 2-CPU machine)."""
    import ray

    workers = cfg.ray.num_workers
    if workers <= 0:
        return None
    total = ray.cluster_resources().get("CPU", 0)
    if total - workers * 1.0 >= cfg.train.decode_cpus:
        return None
    per_worker = {"CPU": max(0.1, (total - cfg.train.decode_cpus) / workers)}
    if cfg.ray.use_gpu:
        per_worker["GPU"] = 1
    return per_worker


def trainer_cpus(cfg: Config) -> float:
    """CPUs the Ray Train workers of a dataset-reading run hold (0 in local mode: the loop
    runs in the driver): what the decode stage cannot use."""
    if cfg.ray.num_workers <= 0:
        return 0.0
    per_worker = worker_resources(cfg)
    return cfg.ray.num_workers * (per_worker["CPU"] if per_worker else 1.0)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def storage_path(cfg: Config) -> str:
    check_shared_storage(cfg.ray, cfg.out)  # a local path on a multi-node cluster: stop here
    path = cfg.ray.storage_path or storage.join(cfg.out, "ray")
    if not storage.is_remote(path):
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
    return path


# Optimizer steps the current Tune trial has trained so far in this process (sweeps): the
# ``pipeline_step`` of its reports, which ASHA uses as time (distill steps, then finetune's).
_TRIAL_STEPS = [0]


def in_tune_trial() -> bool:
    """True in a Ray Tune trial's own process (a ``ktray sweep`` trial)."""
    if "ray.tune" not in sys.modules:  # a trial's process has imported Tune
        return False
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    return bool(_in_tune_session())


def start_trial() -> None:
    _TRIAL_STEPS[0] = 0


def trial_steps() -> int:
    return _TRIAL_STEPS[0]


def add_trial_steps(stage: str, steps) -> None:
    """Count a student stage's steps (trained or reused) into the trial's ``pipeline_step``;
    the teacher's do not count (they differ between trials that retrain it)."""
    if not stage.startswith("teacher"):
        _TRIAL_STEPS[0] += int(steps or 0)


def tune_metrics(metrics: dict, extra: dict) -> dict:
    """A training report as a Tune result: + the stage and the trial-wide step count."""
    step = int(metrics.get("step") or 0) if extra.get("count", True) else 0
    return dict(metrics, stage=extra.get("stage", ""), pipeline_step=extra.get("offset", 0) + step)


def _tune_callback(extra: dict):
    """TuneReportCallback (ray.tune.integration.ray_train) forwarding Ray Train workers'
    reports to the trial, with tune_metrics' additions."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Forward(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.extra = extra

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(
                run_context, [tune_metrics(m, self.extra) for m in metrics], checkpoint
            )

    return _Forward()


class RaySession:
    """A ktray training session inside a Ray Train worker (or Train V2 local mode).

    Train V2 local mode inside a Tune trial (``ktray sweep`` with ``ray.num_workers=0``): Ray
    Train's per-worker API refuses to run in a Tune trial, so the session reports to Tune
    directly (``tune`` = the stage's extra fields) and keeps no checkpoints: a failed trial is
    retried by Tune and reuses the stages it finished.
    """

    def __init__(self, tune: dict | None = None):
        self.tune = tune if tune is not None and in_tune_trial() else None
        if self.tune is not None:
            self.rank, self.world_size = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            return
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = (
            ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        )

    def prepare_model(self, model):
        import ray.train.torch

        if self.world_size == 1:
            return model.to(self.device)
        # Only what trains reaches here (a student, its projector, a task model with its frozen
        # part marked requires_grad=False): every parameter DDP sees gets a gradient.
        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader):
        import ray.train.torch

        if self.world_size == 1:
            return loader
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def dataset(self, name):
        """This worker's shard of the Ray Data dataset ``name`` passed to the trainer (in
        Train V2 local mode the dataset itself: same ``iter_torch_batches`` API)."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics, state):
        if self.tune is not None:
            import ray.tune

            ray.tune.report(tune_metrics(metrics, self.tune))
            return
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
        if self.tune is not None:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
        log.warning("resuming from a checkpoint at step %s", state.get("step"))
        return state


def dataset_config(datasets: dict | None):
    """Train's ingest options for ``datasets``: Ray's defaults (this process's DataContext),
    with ``preserve_order`` kept where a dataset's own context asks for it. Ray Train workers
    read a dataset under Train's ingest options, which would drop it (local mode reads the
    dataset as it is). None when no dataset asks."""
    import copy

    import ray.data
    import ray.train

    datasets = datasets or {}
    ordered = {n for n, ds in datasets.items() if ds.context.execution_options.preserve_order}
    if not ordered:
        return None
    options = {}
    for name in datasets:
        options[name] = copy.copy(ray.data.DataContext.get_current().execution_options)
        options[name].preserve_order = name in ordered
    return ray.train.DataConfig(execution_options=options)


def fit(
    cfg: Config, name: str, worker: Callable[[dict], dict], spec: dict, datasets: dict | None = None
) -> dict:
    """Run ``worker(spec)`` under a Ray Train ``TorchTrainer``; return its last metrics.

    ``datasets`` (Ray Data datasets) go to ``TorchTrainer(datasets=...)``: each worker reads
    its shard with ``session.dataset(name)``. In a Tune trial (``ktray sweep``) every report
    also goes to Tune: through a TuneReportCallback with Ray Train workers, from the session
    itself in local mode.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    workers = cfg.ray.num_workers
    callbacks, tune_extra = [], None
    if in_tune_trial():
        tune_extra = {
            "stage": name,
            "offset": _TRIAL_STEPS[0],
            "count": not name.startswith("teacher"),
        }
        if workers > 0:
            callbacks.append(_tune_callback(tune_extra))
        else:
            spec = dict(spec, tune=tune_extra)
    per_worker = worker_resources(cfg) if datasets else None
    scaling = ray.train.ScalingConfig(
        num_workers=workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=per_worker
    )
    run_config = ray.train.RunConfig(
        name=name.replace("/", "-").replace("@", "-"),
        storage_path=storage_path(cfg),
        failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        worker,
        train_loop_config=spec,
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets or None,
        dataset_config=dataset_config(datasets),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    # The worker's return value: its final metrics (flops, ...) and the report history. With
    # Ray Train workers, result.metrics holds only the last *checkpointed* report's metrics.
    if isinstance(result.return_value, dict):
        metrics = dict(result.return_value)
    else:
        metrics = dict(result.metrics or {})
    if tune_extra is not None:
        add_trial_steps(name, metrics.get("step"))
    return metrics
