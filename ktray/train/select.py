"""Choosing the weights a run keeps by a validation score (no ray here).

A :class:`Selector` is handed to :func:`ktray.train.loop.train_steps`: the loop calls
:meth:`Selector.observe` at step 0 (before any update) and at every step :meth:`Selector.due`
names or a report falls on, puts :meth:`Selector.state_dict` into its checkpoints (a restored
run keeps the best weights seen before the failure) and ends with :meth:`Selector.finish`,
which loads the chosen weights into the trained module.

Under DDP the ranks' BatchNorm statistics differ after a step (DDP broadcasts buffers at the
next forward), so only rank 0 evaluates (rank 0 also saves the model); its score is broadcast
and every rank takes the same decision from it, early stopping included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

POLICIES = ("best_val", "last")


def _broadcast(value, world_size: int, device: torch.device | None = None):
    """Rank 0's ``value`` on every rank (itself when not distributed); NCCL moves it through
    ``device`` (this rank's GPU)."""
    if world_size <= 1:
        return value
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    nccl = dist.get_backend() == "nccl"
    dist.broadcast_object_list(box, src=0, device=device if nccl else None)
    return box[0]


def _cpu_copy(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class Selector:
    """Keeps the weights of the best validation score seen (``best_val``), or the last ones.

    Args:
        evaluate: ``evaluate() -> float``, the validation score of the current weights (higher
            is better); called on rank 0 only.
        target: the module whose weights are kept and restored (the checkpointed one).
        rank, world_size: this worker's place (``session.rank`` / ``session.world_size``).
        device: this worker's device (``session.device``: the GPU NCCL broadcasts through).
        every: evaluate every this many optimizer steps (0 = only at the loop's reports), plus
            step 0 and the last step.
        patience: ``best_val`` only: stop after this many evaluations without improvement
            (0 = never stop early).
        policy: ``best_val`` (highest score; a tie keeps the earlier step) or ``last``.
        metric: the name the score is reported under.
    """

    def __init__(
        self,
        evaluate: Callable[[], float],
        target: nn.Module,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        every: int = 0,
        patience: int = 0,
        policy: str = "best_val",
        metric: str = "val_accuracy",
    ):
        if policy not in POLICIES:
            raise ValueError(f"selection policy must be one of {POLICIES}, not {policy!r}")
        self.evaluate, self.target = evaluate, target
        self.rank, self.world_size, self.device = rank, world_size, device
        self.every, self.patience, self.policy, self.metric = every, patience, policy, metric
        self.history: list[dict] = []
        self.best_step: int | None = None
        self.best_score = float("-inf")
        self.best_state: dict | None = None
        self.since_best = 0
        self.stop = False

    def due(self, step: int) -> bool:
        """Whether ``step`` is one of the selector's own evaluation steps."""
        return self.every > 0 and step % self.every == 0

    def observe(self, step: int) -> dict:
        """Evaluate the weights after ``step`` optimizer steps; keep them if they are the best
        so far; returns ``{metric: score}`` for the report."""
        if self.history and self.history[-1]["step"] == step:
            return {self.metric: self.history[-1][self.metric]}
        score = float(self.evaluate()) if self.rank == 0 else None
        score = float(_broadcast(score, self.world_size, self.device))
        self.history.append({"step": step, self.metric: score})
        if self.policy == "last" or score > self.best_score:
            self.best_score, self.best_step, self.since_best = score, step, 0
            if self.rank == 0:  # the rank that saves the model
                self.best_state = _cpu_copy(self.target)
        else:
            self.since_best += 1
            if self.policy == "best_val" and 0 < self.patience <= self.since_best:
                self.stop = True
        return {self.metric: score}

    def state_dict(self) -> dict:
        """What a checkpoint carries, so a restored run does not forget the best weights."""
        return {
            "history": list(self.history),
            "best_step": self.best_step,
            "best_score": self.best_score,
            "best_state": self.best_state,
            "since_best": self.since_best,
            "stop": self.stop,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.best_step, self.best_score = state["best_step"], state["best_score"]
        self.since_best, self.stop = state["since_best"], state["stop"]
        self.best_state = state["best_state"] if self.rank == 0 else None

    def finish(self) -> dict:
        """Load the chosen weights into ``target`` (rank 0); returns ``selected_step``,
        ``selected_<metric>``, ``select`` (the policy) and ``val_history``."""
        if self.best_state is not None:
            device = next(iter(self.target.state_dict().values())).device
            self.target.load_state_dict({k: v.to(device) for k, v in self.best_state.items()})
        return {
            "selected_step": self.best_step,
            f"selected_{self.metric}": self.best_score if self.history else None,
            "select": self.policy,
            "val_history": [dict(h) for h in self.history],
            "stopped_early": self.stop,
        }


@torch.no_grad()
def same_weights(a: dict, b: dict) -> bool:
    """Whether two state dicts hold equal tensors (tests and checks)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
