"""Method names: what each row of a comparison trains, and from which starting weights.

- ``teacher``: the adapted VFM.
- ``scratch``: the student from random init, finetuned on the labels.
- ``init@imagenet``: the student from its architecture's pretrained (ImageNet) weights,
  finetuned; ``init@PATH``: from any checkpoint (a state-dict file or a ktray model folder).
- ``OBJECTIVE@TRANSFER`` (``task@in_domain``, ``features@generic``, ...): the student distilled
  on a transfer set, then finetuned; ``OBJECTIVE@TRANSFER+init@imagenet`` (or ``+init@PATH``)
  distils a student that starts from those weights instead of random init.

The starting weights belong to the method, so every starting point gets its own outputs
(``OUT/finetune/<method>``) and its own table row; ``student.pretrained`` and
``student.checkpoint`` are set from the method (a user setting them directly is refused, see
:func:`check_student_init`).
"""

from __future__ import annotations

from typing import NamedTuple

from ktray.errors import KtrayError
from ktray.settings import resolve_choices

BASELINES = ("teacher", "scratch")
"""Methods that need no transfer set and name no starting weights."""
INIT = "init"
"""The ``init@WEIGHTS`` prefix (a student finetuned from those weights)."""
IMAGENET = "imagenet"
"""``init@imagenet``: the student architecture's own pretrained weights."""
INIT_SEP = "+init@"
"""Separates a distillation method from the weights its student starts from."""


class Method(NamedTuple):
    """A parsed method name (not a config section: no ``setting``s here)."""

    name: str
    """The method as written."""
    objective: str
    """``teacher``, ``scratch``, ``init`` or a distillation objective (``task``, ``features``)."""
    transfer: str = ""
    """The transfer set a distillation method trains on ('' otherwise)."""
    init: str = ""
    """The student's starting weights: '' (random), ``imagenet`` or a checkpoint path."""

    @property
    def distills(self) -> bool:
        return bool(self.transfer)

    @property
    def student(self) -> bool:
        return self.objective != "teacher"

    @property
    def distill_name(self) -> str:
        """The distill stage's output name: the method's (``task@in_domain+init@imagenet``)."""
        return self.name if self.distills else ""

    def student_overrides(self) -> dict:
        """The ``student.*`` settings this method trains with."""
        return {
            "student.pretrained": self.init == IMAGENET,
            "student.checkpoint": "" if self.init in ("", IMAGENET) else self.init,
        }


def _init_of(method: str, text: str) -> str:
    if not text.strip():
        raise KtrayError(
            f"method '{method}' names no weights after 'init@': use init@imagenet or init@PATH"
        )
    return text.strip()


def parse(method: str) -> Method:
    """Parse a method name; raises a one-line KtrayError naming what is wrong."""
    if not isinstance(method, str):
        raise KtrayError(f"a method name must be a string, got {method!r}")
    if method in BASELINES:
        return Method(method, method)
    if method.startswith(INIT + "@"):
        return Method(method, INIT, init=_init_of(method, method[len(INIT) + 1 :]))
    if "@" not in method:
        raise KtrayError(
            f"unknown method '{method}': use teacher, scratch, init@imagenet, init@PATH or "
            "OBJECTIVE@TRANSFER[+init@WEIGHTS] (e.g. task@in_domain)"
        )
    base, sep, init = method.partition(INIT_SEP)
    objective, transfer = base.split("@", 1)
    objectives = resolve_choices("ktray.distill:OBJECTIVES")
    if objective not in objectives:
        raise KtrayError(
            f"unknown objective '{objective}' in method '{method}'; valid: "
            f"{', '.join(objectives)} (or init@WEIGHTS, scratch, teacher)"
        )
    if not transfer:
        raise KtrayError(f"method '{method}' names no transfer set after '@'")
    return Method(method, objective, transfer, _init_of(method, init) if sep else "")


def parse_method(method: str) -> tuple[str, str]:
    """``"task@generic"`` -> ("task", "generic"); ``"init@imagenet"`` -> ("init", "");
    ``"scratch"``/``"teacher"`` -> (name, "")."""
    m = parse(method)
    return m.objective, m.transfer


def describe(method: str) -> str:
    """What a method is, in words (the results table's "what it is" column)."""
    m = parse(method)
    if m.objective == "teacher":
        return "adapted VFM (backbone + task head)"
    start = {"": "random init", IMAGENET: "ImageNet (pretrained) weights"}.get(
        m.init, f"checkpoint {m.init}"
    )
    if m.objective == "scratch":
        return "student from random init, finetuned on the labels"
    if m.objective == INIT:
        return f"student from {start}, finetuned on the labels"
    kind = {"task": "task-oriented distillation", "features": "task-agnostic feature distillation"}
    what = kind.get(m.objective, f"{m.objective} distillation")
    return f"{what} on {m.transfer.replace('_', '-')} from {start}, then finetuned"


def check_student_init(cfg) -> None:
    """Refuse ``student.pretrained`` / ``student.checkpoint`` set by hand: the method names the
    starting weights (so a pretrained start never runs, or is reported, as ``scratch``)."""
    s = cfg.student
    if s.pretrained or s.checkpoint:
        key, value = (
            ("student.checkpoint", s.checkpoint) if s.checkpoint else ("student.pretrained", True)
        )
        weights = s.checkpoint or IMAGENET
        raise KtrayError(
            f"{key}={value}: name the student's starting weights in the method instead: "
            f"init@{weights} (finetuned from them) or task@in_domain+init@{weights} "
            "(distilled from them), so each start gets its own outputs and table row"
        )
