"""An estimate of a whole run, printed before it starts (``ktray run`` / ``ktray demo``).

The work of each stage is counted from the config and the task's row counts (images the
teacher and the student process, forward or forward + backward), and priced with per-image
times measured here on small random-weight copies of the models (a few batches each, a few
seconds). The times are this process's device: with GPU workers on a cluster whose driver has
none, the estimate is a CPU upper bound and says so. Stages already finished are not skipped
(an upper bound on a rerun); Ray start-up and I/O are not counted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ktray.config import Config
from ktray.pipeline.validate import method_transfers, parse_method
from ktray.train.loop import eta_text


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds per image on this machine."""

    teacher_forward: float
    student_train: float
    student_forward: float
    device: str


def _per_image(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (allocations, oneDNN primitives)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * len(x))


def measure_costs(cfg: Config, num_classes: int, batch: int = 64, repeats: int = 2) -> Costs:
    """Time the teacher's forward and the student's training step on random weights, at the
    run's batch sizes up to ``batch`` (per-image costs of small models fall with the batch)."""
    from ktray.models import TaskModel, create_backbone
    from ktray.models.student import create_student

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = cfg.teacher, cfg.student
    teacher = TaskModel(create_backbone(t.backbone, pretrained=False, img_size=t.img_size), 2)
    teacher = teacher.eval().to(device, memory_format=torch.channels_last)
    student = create_student(s.arch, num_classes, img_size=s.img_size).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def image(size: int, n: int) -> torch.Tensor:
        return torch.randn(min(n, batch), 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last
        )

    def train_step(x: torch.Tensor) -> None:
        loss = student(x).float().logsumexp(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.inference_mode():
        teacher_fwd = _per_image(teacher, image(t.img_size, cfg.eval_batch_size), repeats)
    student_train = _per_image(train_step, image(s.img_size, cfg.distill.batch_size), repeats)
    student.eval()
    with torch.inference_mode():
        student_fwd = _per_image(student, image(s.img_size, cfg.eval_batch_size), repeats)
    return Costs(teacher_fwd, student_train, student_fwd, device.type)


def plan(cfg: Config, rows: dict, costs: Costs) -> list[tuple[str, float]]:
    """``[(what, seconds)]``: each stage the methods need, once (shared stages counted once).

    Args:
        rows: the task's row counts (``train``, ``test``, ``unlabeled``, ``generic``, ...).
    """
    t, d, f = cfg.teacher, cfg.distill, cfg.finetune
    train, test = rows.get("train", 0), rows.get("test", 0)
    out: list[tuple[str, float]] = []
    # teacher: a linear probe runs the backbone once per cached view; else every step
    # trains it (~3x a forward). Then the test split.
    steps = max(1, t.epochs * -(-train // t.batch_size))
    if t.mode == "linear":
        fit = max(1, t.probe_views) * train * costs.teacher_forward
    else:
        fit = steps * t.batch_size * 3 * costs.teacher_forward
    out.append(("teacher (adapt + test)", fit + test * costs.teacher_forward))
    student_methods = [m for m in cfg.methods if m != "teacher"]
    transfers = method_transfers(cfg)
    sizes = {"in_domain": rows.get("unlabeled", 0), "generic": rows.get("generic", 0)}
    if "curated" in transfers:
        c = cfg.curate
        crops = 1 + len(c.scales) * c.grid * c.grid
        queries = (
            train + test
        ) * crops  # labeled queries + the test images leaks are checked against
        if c.gallery:  # a user's gallery: its size is not known before it is listed
            out.append(
                ("curate (queries only; gallery not counted)", queries * costs.teacher_forward)
            )
        else:  # the in-domain and generic images mixed
            gallery = sizes["in_domain"] + sizes["generic"]
            out.append(
                (
                    "curate (embed gallery crops)",
                    (gallery * crops + queries) * costs.teacher_forward,
                )
            )
        sizes["curated"] = c.images_per_query * train
    for transfer in transfers:
        online = d.teacher_mode == "online"
        if not online and not d.targets:
            views = cfg.logits.views
            out.append(
                (f"logits[{transfer}]", sizes.get(transfer, 0) * views * costs.teacher_forward)
            )
    ft_eval = test * costs.student_forward
    for method in student_methods:
        if parse_method(method)[0] in ("task", "features"):
            per = costs.student_train + (costs.teacher_forward if d.teacher_mode == "online" else 0)
            out.append((f"distill[{method}]", d.steps * d.batch_size * per + ft_eval))
        scratch_steps = getattr(f, "scratch_steps", 0)
        ft_steps = scratch_steps if method == "scratch" and scratch_steps else f.steps
        out.append((f"finetune[{method}]", ft_steps * f.batch_size * costs.student_train + ft_eval))
    return out


def describe(cfg: Config, rows: dict, num_classes: int) -> str:
    """The estimate as printed at the start of a run."""
    started = time.perf_counter()
    costs = measure_costs(cfg, num_classes)
    stages = plan(cfg, rows, costs)
    total = sum(s for _, s in stages)
    lines = [
        f"estimate: {eta_text(total).replace('ETA ', '~')} of model compute on this "
        f"machine's {costs.device} ({len(stages)} stages; measured in "
        f"{time.perf_counter() - started:.1f} s; Ray start-up and I/O not counted"
        + ("; GPU workers will be faster)" if costs.device == "cpu" else ")")
    ]
    lines += [f"  {what:36s} {eta_text(s).replace('ETA ', '~'):>8s}" for what, s in stages]
    return "\n".join(lines)
