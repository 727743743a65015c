"""The plain-PyTorch training loop every stage uses (no ray here).

A :class:`Session` abstracts where the loop runs: :class:`LocalSession` is a plain process;
``ktray.stages.common.RaySession`` wraps Ray Train (DDP model/loader preparation, reporting,
checkpoints, restore after a worker failure). The loop counts optimizer steps, not epochs, so
methods compare at equal compute; it reports and checkpoints at every epoch end, and a restored
run continues its step count instead of restarting.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, Protocol

import torch
from torch import nn

log = logging.getLogger("ktray")


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def prepare_loader(self, loader): ...
    def report(self, metrics: dict, state: dict | None) -> None: ...
    def restore(self) -> dict | None: ...


class LocalSession:
    """Run in this process, on CPU or the first GPU; keeps every reported metric dict."""

    def __init__(self, device: str | None = None):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[dict] = []
        self.last_state: dict | None = None

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def report(self, metrics, state):
        self.reports.append(dict(metrics))
        if state is not None:
            self.last_state = state

    def restore(self):
        return None


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr,
                             weight_decay=weight_decay)


def make_scheduler(opt, steps: int, warmup_steps: int):
    """Linear warm-up then cosine decay to zero over ``steps`` optimizer steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def train_steps(
    module: nn.Module,
    step_fn: Callable[[nn.Module, object], dict],
    loader: Iterable,
    session: Session,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int = 0,
    set_epoch: Callable[[int], None] | None = None,
    extra_metrics: Callable[[], dict] | None = None,
    report_every: int = 1,
) -> dict:
    """Train ``module`` for ``steps`` optimizer steps.

    Args:
        module: the (already session-prepared) module holding every trainable parameter.
        step_fn: ``step_fn(module, batch) -> {"loss": Tensor, "n": int, ...}``; other tensor
            entries are averaged into the epoch metrics.
        loader: an iterable of batches, re-iterated each epoch.
        session: where reports and checkpoints go.
        set_epoch: called with the epoch index before each pass (DistributedSampler).
        extra_metrics: called at each report for more metrics (e.g. validation accuracy).
        report_every: report (and checkpoint) at the first epoch end at least this many steps
            after the last report, and always at the end: tiny labeled sets have epochs of a
            few steps, and a checkpoint per epoch would cost more than the training.

    Returns:
        The last epoch's metrics: ``step``, ``epoch``, ``loss``, ``images``, ``seconds``, plus
        ``history`` (every report's numeric metrics, carried through checkpoints, so a run
        restored after a failure still has the reports made before it) and ``resumed_from``
        (the step of the checkpoint this run was restored from; 0 for a fresh run).
    """
    opt = make_optimizer(module.parameters(), lr, weight_decay)
    sched = make_scheduler(opt, steps, warmup_steps)
    step, epoch, images, seconds = 0, 0, 0, 0.0
    state = session.restore()
    if state is not None:
        unwrap(module).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch = state["step"], state["epoch"]
        images, seconds = state.get("images", 0), state.get("seconds", 0.0)
    history = list(state.get("history", [])) if state is not None else []
    resumed_from = step
    metrics = {"step": step, "epoch": epoch, "images": images, "seconds": seconds}
    last_report = step
    sums: dict[str, float] = {}
    batches = 0
    module.train()
    while step < steps:
        if set_epoch is not None:
            set_epoch(epoch)
        start, epoch_batches = time.perf_counter(), 0
        for batch in loader:
            if batch is None:
                continue
            out = step_fn(module, batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            step += 1
            batches += 1
            epoch_batches += 1
            images += int(out.get("n", 0)) * session.world_size
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            if step >= steps:
                break
        if epoch_batches == 0:
            raise RuntimeError("the training loader yielded no batch (every image unreadable?)")
        seconds += time.perf_counter() - start
        epoch += 1
        if step < steps and step - last_report < report_every:
            continue
        last_report = step
        metrics = {k: v / batches for k, v in sums.items()}
        sums, batches = {}, 0
        metrics.update(step=step, epoch=epoch, images=images, seconds=seconds,
                       lr=sched.get_last_lr()[0])
        if extra_metrics is not None:
            metrics.update(extra_metrics())
            module.train()
        history.append({k: v if isinstance(v, int) else round(float(v), 6)
                        for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        state = {"model": unwrap(module).state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                 "images": images, "seconds": seconds, "history": history}
        if session.rank == 0:
            log.info("  step %d/%d  loss %.4f  %.0f img/s", step, steps,
                     metrics.get("loss", float("nan")), images / max(seconds, 1e-9))
        session.report(metrics, state)
    return dict(metrics, history=history, resumed_from=resumed_from)
