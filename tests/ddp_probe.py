"""Per-rank parameter dumps from Ray Train workers, for the DDP test.

``install`` is a Ray ``worker_process_setup_hook``: in every worker process of a Ray started
with ``KTRAY_DDP_PROBE_DIR`` set, each optimizer created afterwards saves its parameters to
``$KTRAY_DDP_PROBE_DIR/rank<R>.pt`` after every step (R = the torch.distributed rank, else 0).
The test then compares what each rank ended with, without any hook in ktray itself.
"""

from __future__ import annotations

import os

ENV = "KTRAY_DDP_PROBE_DIR"


def install() -> None:
    out = os.environ.get(ENV)
    if not out:
        return
    import torch

    original = torch.optim.Optimizer.__init__

    def save(optimizer, args, kwargs) -> None:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        params = [p.detach().cpu().clone() for g in optimizer.param_groups for p in g["params"]]
        tmp = os.path.join(out, f".rank{rank}.pt.tmp")
        torch.save(params, tmp)
        os.replace(tmp, os.path.join(out, f"rank{rank}.pt"))

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_step_post_hook(save)

    torch.optim.Optimizer.__init__ = __init__
