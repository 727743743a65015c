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
    encoder_forward: float | None = None
    """Curation's encoder at ``curate.img_size`` (None: priced as the teacher's forward)."""


def _per_image(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int) -> float:
    for _ in range(2):  # warm-up: allocations, oneDNN primitives (a training step's first two
        fn(x)  # calls on CPU take ~10x a steady one)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * len(x))


def measure_costs(
    cfg: Config,
    num_classes: int,
    batch: int = 64,
    repeats: int = 2,
    segmentation: bool = False,
) -> Costs:
    """Time the teacher's forward and the student's training step on random weights, at the
    run's batch sizes up to ``batch`` (per-image costs of small models fall with the batch).
    ``segmentation``: the dense teacher (backbone maps + ``teacher.head``) and the dense
    student (``student.arch`` + ``student.head`` decoder), as the segmentation stages run."""
    from ktray.models import TaskModel, create_backbone
    from ktray.models.dense import DenseStudent, build_dense_teacher
    from ktray.models.student import create_student

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = cfg.teacher, cfg.student
    if segmentation:
        teacher = build_dense_teacher(
            t.backbone, num_classes, t.head, pretrained=False, img_size=t.img_size
        )
        student = DenseStudent(s.arch, num_classes, s.head)
    else:
        teacher = TaskModel(create_backbone(t.backbone, pretrained=False, img_size=t.img_size), 2)
        student = create_student(s.arch, num_classes, img_size=s.img_size)
    teacher = teacher.eval().to(device, memory_format=torch.channels_last)
    # channels_last as the workers train it (a contiguous model fed channels_last images takes
    # a slow mixed-format path: ~10x a step on CPU)
    student = student.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def image(size: int, n: int) -> torch.Tensor:
        return torch.randn(min(n, batch), 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last
        )

    def train_step(x: torch.Tensor) -> None:
        # over classes: the last axis of [B, C] logits, axis 1 of dense [B, C, h, w] ones
        loss = student(x).float().logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.inference_mode():
        teacher_fwd = _per_image(teacher, image(t.img_size, cfg.eval_batch_size), repeats)
    student_train = _per_image(train_step, image(s.img_size, cfg.distill.batch_size), repeats)
    student.eval()
    with torch.inference_mode():
        student_fwd = _per_image(student, image(s.img_size, cfg.eval_batch_size), repeats)
    encoder_fwd = None
    if "curated" in method_transfers(cfg):
        encoder_fwd = _encoder_forward(cfg, device, image, repeats, teacher_fwd)
    return Costs(teacher_fwd, student_train, student_fwd, device.type, encoder_fwd)


def _encoder_forward(cfg: Config, device, image, repeats: int, teacher_fwd: float) -> float:
    """Per-image time of curation's encoder (``curate.encoder``, default the teacher's
    backbone) at ``curate.img_size``; a name timm cannot build offline (e.g. an open_clip
    model) is priced as the teacher's forward scaled by the pixels."""
    from ktray.models import create_backbone

    c, t = cfg.curate, cfg.teacher
    try:
        enc = create_backbone(c.encoder or t.backbone, pretrained=False, img_size=c.img_size)
    except Exception:  # an estimate must not stop the run
        return teacher_fwd * (c.img_size / t.img_size) ** 2
    enc = enc.eval().to(device, memory_format=torch.channels_last)
    with torch.inference_mode():
        return _per_image(enc, image(c.img_size, c.batch_size), repeats)


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
        # labeled queries + the test images leaks are checked against
        queries = (train + test) * crops
        enc = costs.encoder_forward if costs.encoder_forward is not None else costs.teacher_forward
        if c.gallery:  # a user's gallery: its size is not known before it is listed
            out.append(("curate (queries only; gallery not counted)", queries * enc))
        else:  # the in-domain and generic images mixed
            gallery = sizes["in_domain"] + sizes["generic"]
            out.append(("curate (embed gallery crops)", (gallery * crops + queries) * enc))
        sizes["curated"] = c.images_per_query * train
    for transfer in transfers:
        online = d.teacher_mode == "online"
        if not online and not d.targets:
            views = cfg.logits.views
            out.append(
                (f"logits[{transfer}]", sizes.get(transfer, 0) * views * costs.teacher_forward)
            )
    ft_eval = test * costs.student_forward
    # every student stage runs once per seed (seeds=N); the teacher and logits passes once
    n = max(1, int(getattr(cfg, "seeds", 1)))
    times = f" x{n} seeds" if n > 1 else ""
    for method in student_methods:
        if parse_method(method)[0] in ("task", "features"):
            per = costs.student_train + (costs.teacher_forward if d.teacher_mode == "online" else 0)
            out.append((f"distill[{method}]{times}", n * (d.steps * d.batch_size * per + ft_eval)))
        scratch_steps = getattr(f, "scratch_steps", 0)
        ft_steps = scratch_steps if method == "scratch" and scratch_steps else f.steps
        ft = ft_steps * f.batch_size * costs.student_train + ft_eval
        out.append((f"finetune[{method}]{times}", n * ft))
    return out


def describe(cfg: Config, rows: dict, num_classes: int, segmentation: bool = False) -> str:
    """The estimate as printed at the start of a run."""
    started = time.perf_counter()
    costs = measure_costs(cfg, num_classes, segmentation=segmentation)
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
