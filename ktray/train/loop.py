"""The plain-PyTorch training loop every stage uses (no ray here).

A :class:`Session` abstracts where the loop runs: :class:`LocalSession` is a plain process;
``ktray.stages.common.RaySession`` wraps Ray Train (DDP model/loader preparation, reporting,
checkpoints, restore after a worker failure). The loop counts optimizer steps, not epochs, so
methods compare at equal compute; it reports every ``report_every`` steps and checkpoints every
``checkpoint_every`` steps (mid-epoch: one epoch of a web-scale transfer set is many thousand
steps), and a restored run continues its step count instead of restarting. Per-step metrics
are summed on the device and read back only at reports (no host sync per step); bf16
autocast (``precision``) and ``torch.compile`` are opt-in per run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

log = logging.getLogger("ktray")


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def prepare_loader(self, loader): ...
    def dataset(self, name: str): ...
    def report(self, metrics: dict, state: dict | None) -> None: ...
    def restore(self) -> dict | None: ...


class LocalSession:
    """Run in this process, on CPU or the first GPU; keeps every reported metric dict."""

    def __init__(
        self, device: str | None = None, datasets: dict | None = None, state: dict | None = None
    ):
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports: list[dict] = []
        self.last_state: dict | None = None
        self.states: list[dict] = []
        self.datasets = dict(datasets or {})
        self.initial_state = state

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def dataset(self, name):
        """An object with ``iter_torch_batches(...)`` (e.g. ``ktray.data.datasets.ViewStream``)."""
        return self.datasets[name]

    def report(self, metrics, state):
        self.reports.append(dict(metrics))
        if state is not None:  # a snapshot, as a written checkpoint would be
            self.last_state = copy.deepcopy(state)
            self.states.append(self.last_state)

    def restore(self):
        return self.initial_state


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision == "bf16"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def eta_text(seconds: float) -> str:
    """``ETA 1h02m``, ``ETA 3m05s``, ``ETA 12s``: the remaining time of a long stage."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"ETA {s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"ETA {s // 60}m{s % 60:02d}s"
    return f"ETA {s}s"


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
    report_every: int = 50,
    checkpoint_every: int = 50,
    precision: str = "fp32",
    state_module: nn.Module | None = None,
    selector=None,
) -> dict:
    """Train ``module`` for ``steps`` optimizer steps.

    Args:
        module: the (already session-prepared) module holding every trainable parameter
            (those with ``requires_grad``; a frozen teacher inside it is left alone).
        step_fn: ``step_fn(module, batch) -> {"loss": Tensor, "n": int, ...}``; other scalar
            tensor entries are averaged over the steps between reports (summed on the device).
        loader: an iterable of batches, re-iterated each epoch. Its ``passes`` attribute, if
            any, says how many passes over the data one iteration makes (``epoch`` counts
            passes: a streamed transfer set runs all the passes a run needs in one iteration).
        session: where reports and checkpoints go.
        set_epoch: called with the epoch index before each pass (DistributedSampler).
        extra_metrics: called at each report for more metrics (e.g. validation accuracy).
        report_every: report every this many optimizer steps, and at the end.
        checkpoint_every: attach a checkpoint to the first report at least this many steps
            after the last one, and to the last report.
        precision: ``bf16`` runs ``step_fn`` under bf16 autocast; ``fp32`` as is.
        state_module: what a checkpoint holds and restores (default: ``module`` unwrapped);
            distillation passes the student (+ projector) so no teacher is stored.
        selector: a :class:`ktray.train.select.Selector` (or None): observed at step 0, at
            each step its ``due(step)`` names, at each report and at the end (its score joins
            the report); carried in checkpoints; its ``stop`` ends the run early (at a
            report with a checkpoint); its ``finish()`` loads the chosen weights into
            ``state_module`` and adds ``selected_step`` etc. to the result.

    Returns:
        The last report's metrics: ``step``, ``epoch``, ``loss``, ``images``, ``seconds``,
        plus ``history`` (every report's numeric metrics, carried through checkpoints, so a
        run restored after a failure still has the reports made before it) and
        ``resumed_from`` (the step of the checkpoint this run was restored from; 0 for a
        fresh run). A restored run continues mid-epoch at its step count. With a
        ``selector``, ``step`` is the last step trained (early stopping: before ``steps``).
    """
    target = state_module if state_module is not None else unwrap(module)
    opt = make_optimizer(module.parameters(), lr, weight_decay)
    sched = make_scheduler(opt, steps, warmup_steps)
    step, epoch, images, seconds = 0, 0, 0, 0.0
    state = session.restore()
    if state is not None:
        target.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch = state["step"], state["epoch"]
        images, seconds = state.get("images", 0), state.get("seconds", 0.0)
        if selector is not None and state.get("selector") is not None:
            selector.load_state_dict(state["selector"])
    history = list(state.get("history", [])) if state is not None else []
    resumed_from = step
    metrics = {"step": step, "epoch": epoch, "images": images, "seconds": seconds}
    last_ckpt = step
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    if selector is not None and state is None:
        selector.observe(0)  # the weights before any update can be the best
    module.train()

    def stopping() -> bool:
        return selector is not None and selector.stop

    def report() -> dict:
        nonlocal sums, batches, last_ckpt
        out = {k: float(v) / max(batches, 1) for k, v in sums.items()}  # the one host sync
        sums, batches = {}, 0
        out.update(
            step=step, epoch=epoch, images=images, seconds=seconds, lr=sched.get_last_lr()[0]
        )
        if extra_metrics is not None:
            out.update(extra_metrics())
            module.train()
        if selector is not None:
            out.update(selector.observe(step))
            module.train()
        history.append(
            {
                k: v if isinstance(v, int) else round(float(v), 6)
                for k, v in out.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        ckpt = None
        if step >= steps or stopping() or step - last_ckpt >= checkpoint_every:
            last_ckpt = step
            ckpt = {
                "model": target.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "epoch": epoch,
                "images": images,
                "seconds": seconds,
                "history": list(history),
            }
            if selector is not None:
                ckpt["selector"] = selector.state_dict()
        if session.rank == 0:
            log.info(
                "  step %d/%d  loss %.4f  %.0f img/s  %s",
                step,
                steps,
                out.get("loss", float("nan")),
                images / max(seconds, 1e-9),
                eta_text((steps - step) * seconds / max(step, 1)) if step < steps else "done",
            )
        session.report(out, ckpt)
        return out

    while step < steps and not stopping():
        if set_epoch is not None:
            set_epoch(epoch)
        start, epoch_batches = time.perf_counter(), 0
        for batch in loader:
            if batch is None:
                continue
            with autocast(session.device, precision):
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
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
            if selector is not None and (selector.due(step) or step >= steps):
                selector.observe(step)
                module.train()
            if step % report_every == 0 or step >= steps or stopping():
                seconds += time.perf_counter() - start
                start = time.perf_counter()
                metrics = report()
            if step >= steps or stopping():
                break
        if epoch_batches == 0:
            raise RuntimeError("the training loader yielded no batch (every image unreadable?)")
        seconds += time.perf_counter() - start
        epoch += getattr(loader, "passes", 1)  # a streamed transfer set: its passes at once
    result = dict(metrics, history=history, resumed_from=resumed_from)
    if selector is not None:
        result.update(selector.finish())
        result["stopped_early"] = bool(result.get("stopped_early")) and step < steps
    return result


def train_spec(
    module: nn.Module, step_fn, loader: Iterable, session: Session, spec, **kwargs
) -> dict:
    """:func:`train_steps` with the schedule of a training spec (``ktray.train.specs``: its
    ``steps``, ``lr``, ``weight_decay``, ``warmup_steps``, ``report_every`` and
    ``checkpoint_every``); ``kwargs`` are the run's other arguments."""
    return train_steps(
        module,
        step_fn,
        loader,
        session,
        steps=spec.steps,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_steps,
        report_every=spec.report_every,
        checkpoint_every=spec.checkpoint_every,
        **kwargs,
    )
