"""The ``sweep`` section of a config, checked before Ray starts (no ray here).

``parse(cfg)`` turns ``sweep.params`` into a list of :class:`Param` (dotted config key, kind,
values) after checking every key and value against the config schema, so a typo is a one-line
error instead of a failed trial. ``shared_stages`` says which stage outputs every trial can
share because no swept key changes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ktray.config import Config, apply_overrides, config_hash, methods
from ktray.errors import KtrayError
from ktray.pipeline.validate import check_config
from ktray.train.specs import TeacherSpec, config_keys

KINDS = ("grid", "choice", "uniform", "loguniform")
SCHEDULERS = ("fifo", "asha")
MODES = ("max", "min")
FORBIDDEN = ("out", "name", "methods", "sweep", "tracking", "ray")
METRICS = (
    "test_accuracy",
    "distill_test_accuracy",
    "test_miou",
    "distill_test_miou",
    "test_pixel_accuracy",
    "train_seconds",
    "finetune_seconds",
    "distill_seconds",
    "wall_seconds",
    "pretrain_flops",
    "finetune_flops",
)

# Config keys each shared stage output depends on (a key ending in '.' is a section prefix).
DATA_KEYS = ("task", "data.")
TRAIN_SPLIT_KEYS = (
    "task",
    "data.kind",
    "data.root",
    "data.label_column",
    "data.labels_per_class",
    "data.val_per_class",
    "data.val_from",
    "data.seed",
)
"""What decides the labeled train / validation images (not ``data.test_limit`` or the transfer
sets): the content the teacher stage fingerprints as its input."""
TEACHER_KEYS = TRAIN_SPLIT_KEYS + tuple(sorted(config_keys(TeacherSpec)))
"""The teacher's reuse key: its spec's settings (derived from ``TeacherSpec``) + its input."""
CURATE_KEYS = DATA_KEYS + ("teacher.", "curate.")
LOGITS_KEYS = DATA_KEYS + TEACHER_KEYS + ("logits.",)


@dataclass
class Param:
    key: str
    """Dotted config key, e.g. ``distill.temperature``."""
    kind: str
    """``grid``, ``choice``, ``uniform`` or ``loguniform``."""
    values: list
    """The values (grid, choice) or ``[lo, hi]`` (uniform, loguniform)."""
    integer: bool = False
    """The field is an int: uniform/loguniform draw integers in ``[lo, hi]``."""


def _is_spec(value) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= set(KINDS)


def flatten(params: dict, prefix: str = "") -> dict:
    """``{distill: {temperature: [..]}}`` and ``{distill.temperature: [..]}`` -> dotted keys
    (a later entry for the same key wins, so a command-line override replaces the file's)."""
    out: dict = {}
    for key, value in (params or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_spec(value):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _field_type(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return type(node)


def _check_value(cfg: Config, key: str, value) -> Config:
    try:
        return apply_overrides(cfg, {key: value})
    except KtrayError as e:
        raise KtrayError(f"sweep.params: {e}") from None


def _param(cfg: Config, key: str, spec) -> Param:
    if key.split(".")[0] in FORBIDDEN:
        raise KtrayError(
            f"sweep.params: '{key}' cannot be swept (the sweep sets out, name, "
            "methods, ray and tracking itself)"
        )
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not _is_spec(spec) or len(spec) != 1:
        raise KtrayError(
            f"sweep.params.{key}: give a list of values (grid) or one of "
            f"{{{', '.join(k + ': ...' for k in KINDS)}}}, not {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise KtrayError(f"sweep.params.{key}.{kind}: expects a non-empty list, got {values!r}")
    _check_value(cfg, key, values[0])  # unknown keys and sections fail here
    typ = _field_type(cfg, key)
    if kind in ("grid", "choice"):
        for v in values:
            _check_value(cfg, key, v)
        return Param(key, kind, list(values))
    if typ not in (int, float):
        raise KtrayError(
            f"sweep.params.{key}: {kind} needs a numeric field, and {key} is {typ.__name__}"
        )
    if (
        len(values) != 2
        or not all(isinstance(v, (int, float)) for v in values)
        or not values[0] < values[1]
    ):
        raise KtrayError(
            f"sweep.params.{key}.{kind}: expects [lo, hi] with lo < hi, got {values!r}"
        )
    if kind == "loguniform" and values[0] <= 0:
        raise KtrayError(f"sweep.params.{key}.loguniform: lo must be positive, got {values[0]}")
    for v in values:
        _check_value(cfg, key, int(v) if typ is int else v)
    return Param(key, kind, list(values), integer=typ is int)


def parse(cfg: Config) -> list[Param]:
    """Check the sweep section of ``cfg``; return the swept parameters. Raises KtrayError."""
    s = cfg.sweep
    flat = flatten(s.params)
    if not flat:
        raise KtrayError(
            "sweep.params is empty: name at least one config key to sweep, e.g. "
            "sweep.params.distill.temperature=[1,2,4]"
        )
    params = [_param(cfg, key, spec) for key, spec in flat.items()]
    for p in params:
        if p.key in ("student.pretrained", "student.checkpoint"):
            raise KtrayError(
                f"sweep.params: '{p.key}' is set by the method: sweep one starting point per "
                "sweep with sweep.method=init@imagenet, init@PATH or task@in_domain+init@..."
            )
    methods.check_student_init(cfg)
    # sweep.method / metric / mode / scheduler / counts: checked by SweepConfig itself
    check_metric(cfg)
    check_config(cfg)
    for p in params:  # e.g. a student arch that does not exist: fail before Ray starts
        for v in p.values if p.kind in ("grid", "choice") else []:
            check_config(apply_overrides(cfg, {p.key: v}))
    return params


SEG_METRICS = ("test_miou", "distill_test_miou", "test_pixel_accuracy")
"""Metrics only segmentation trials report; ``test_accuracy`` / ``distill_test_accuracy``
only classification trials report."""


def task_metric(cfg: Config) -> str:
    """The test metric of the task: ``test_miou`` (segmentation) or ``test_accuracy``."""
    from ktray.data.segmentation import is_segmentation

    return "test_miou" if is_segmentation(cfg.data.kind) else "test_accuracy"


def check_metric(cfg: Config) -> None:
    """``sweep.metric`` is one the task's trials report.

    Raises:
        KtrayError: e.g. ``test_accuracy`` on a segmentation task (its trials report mIoU).
    """
    metric, seg = cfg.sweep.metric, task_metric(cfg) == "test_miou"
    if seg and metric in ("test_accuracy", "distill_test_accuracy"):
        raise KtrayError(
            f"sweep.metric={metric} on a segmentation task: its trials report test_miou, "
            "distill_test_miou and test_pixel_accuracy (e.g. sweep.metric=test_miou)"
        )
    if not seg and metric in SEG_METRICS:
        raise KtrayError(
            f"sweep.metric={metric} is a segmentation metric; this classification task "
            "reports test_accuracy and distill_test_accuracy"
        )


def asha_limits(cfg: Config) -> tuple[int, int]:
    """ASHA's (grace_period, max_t) in optimizer steps. ASHA stops a trial as soon as a report
    reaches max_t, so it gets max_t + 1: a trial that trains max_t steps still finishes (its
    evaluation and final report come after its last training report)."""
    max_t = cfg.sweep.max_t or (cfg.distill.steps + cfg.finetune.steps)
    grace = cfg.sweep.grace_period or max(1, max_t // 4)
    return min(grace, max_t), max_t + 1


def touches(keys: list[str], prefixes: tuple[str, ...]) -> bool:
    return any(k == p or (p.endswith(".") and k.startswith(p)) for k in keys for p in prefixes)


def shared_stages(cfg: Config, params: list[Param]) -> dict:
    """What every trial shares: ``{"teacher": bool, "data": bool, "curate": bool,
    "logits": transfer name or ""}``."""
    keys = [p.key for p in params]
    m = methods.parse(cfg.sweep.method)
    curated = m.transfer == "curated"
    logits_keys = LOGITS_KEYS + (("curate.",) if curated else ())
    # scratch / init@WEIGHTS train no teacher; a method distilling on a set needs its logits
    needs_teacher = m.objective == "teacher" or m.distills
    return {
        "data": not touches(keys, DATA_KEYS),
        "teacher": needs_teacher and not touches(keys, TEACHER_KEYS),
        "curate": curated and not touches(keys, CURATE_KEYS),
        "logits": m.transfer if m.distills and not touches(keys, logits_keys) else "",
    }


def trial_name(overrides: dict) -> str:
    """A trial folder named by its values, so a rerun of the sweep reuses finished trials."""
    return "trial_" + config_hash(json.loads(json.dumps(overrides, default=str)))[:10]


def display(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(display(v) for v in value) + "]"
    return str(value)


def describe(params: list[Param]) -> str:
    return "; ".join(f"{p.key} {p.kind} {display(p.values)}" for p in params)
