"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` overrides.

Every field has a docstring (``tests/test_validation.py`` enforces it) and its checks beside it:
``setting(default, ge=..., choices=...)`` (see :mod:`ktray.settings`), enumerations named in the
module that owns them (loss names in :mod:`ktray.losses`, adaptation modes in
:mod:`ktray.models.heads`, ...). Each section's ``__post_init__`` checks its fields' types and
limits plus the rules between them, so a bad value stops with one line naming the key, the
value and what is allowed (``finetune.steps must be >= 1, got -5``) when the config is
built, before any stage starts. Checks that need more than one section or the file system
(methods against the data, weights, storage) live in :mod:`ktray.pipeline.validate`.

``load_config(path, overrides)`` merges a YAML file (and the config it names as ``base:``) and
command-line overrides onto the defaults, rejects unknown keys with a one-line error that
suggests the closest valid key, and coerces values to the field's type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ktray.config.methods import BASELINES, parse_method  # noqa: F401
from ktray.config.running import CurateConfig, ExportConfig, RayConfig, SweepConfig, TrackingConfig  # noqa: F401
from ktray.config.training import (  # noqa: F401
    DataConfig,
    DistillConfig,
    FinetuneConfig,
    InferConfig,
    LogitsConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from ktray.errors import KtrayError
from ktray.settings import (
    build,
    check_fields,
    merge,
    parse_overrides,
    read_yaml_tree,
    set_dotted,
    setting,
)


@dataclass
class Config:
    out: str = ""
    """Output location (local path or s3://). Empty = ./ktray-out/<name>."""
    name: str = setting("run", nonempty=True)
    """Run name: the default output folder (./ktray-out/NAME) and the MLflow run name."""
    task: str = setting("fashion_mnist", nonempty=True)
    """Task name recorded in results and manifests."""
    methods: list = setting(
        factory=lambda: [
            "teacher",
            "scratch",
            "features@in_domain",
            "task@generic",
            "task@in_domain",
        ],
        nonempty=True,
    )
    """Methods to compare: ``teacher``, ``scratch`` (random init), ``init@imagenet`` /
    ``init@PATH`` (the student from its pretrained weights / a checkpoint), and
    ``OBJECTIVE@TRANSFER[+init@WEIGHTS]`` with OBJECTIVE in {task, features} and TRANSFER in
    {in_domain, generic, curated} or an image-table URI; each is finetuned on the labels."""
    eval_batch_size: int = setting(256, ge=1)
    """Images per forward pass when evaluating."""
    seeds: int = setting(1, ge=1)
    """``ktray run`` / ``demo``: run every student method this many times, replicate ``i`` with
    ``train.seed`` + i (the student's init, batch order and augmentation; the labeled subset,
    the teacher and the logits pass stay shared). Results hold the mean, the sample standard
    deviation and each seed's numbers; replicates after the first write to
    ``OUT/<stage>/<method>~seedN``. ``ktray sweep`` ignores it (sweep ``train.seed`` instead)."""
    estimate: bool = True
    """``ktray run`` / ``demo``: print an estimate of the run's time before it starts (the work
    of each stage priced with per-image times measured on random-weight copies of the models,
    a few seconds)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The task's labeled, test and unlabeled images."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The VFM and how it is adapted."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The small model."""
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    """The teacher's predictions over a transfer set."""
    infer: InferConfig = field(default_factory=InferConfig)
    """Actor pool and decode stage of the Ray Data inference passes."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Pretraining the student on a transfer set."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Finetuning the student on the labeled images."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Precision, compile, step-based reports/checkpoints and the distillation input."""
    curate: CurateConfig = field(default_factory=CurateConfig)
    """Query-balanced crop retrieval of a transfer set from a gallery."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Where and how Ray runs."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """``ktray sweep``: which fields to sweep and how (ignored by the other commands)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Deployable models: ONNX export, int8, the speed table."""

    def __post_init__(self):
        check_fields(self, "")
        for m in self.methods:
            parse_method(m)
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise KtrayError(f"methods lists {', '.join(dup)} more than once")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any, over its ``base:``), then overrides."""
    tree: dict = read_yaml_tree(path, Path(__file__).parent.parent / "configs") if path else {}
    if any(o.split("=", 1)[0].strip() == "sweep.params" for o in overrides or []):
        tree.get("sweep", {}).pop("params", None)  # sweep.params={...} replaces the file's
    return build(Config, merge(tree, parse_overrides(overrides or [])))


def apply_overrides(cfg: Config | dict, values: dict) -> Config:
    """A copy of ``cfg`` with ``{dotted key: value}`` set (coerced; unknown keys rejected)."""
    tree: dict = {}
    for key, value in values.items():
        set_dotted(tree, key, value)
    base = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return build(Config, merge(base, tree))


def to_dict(cfg) -> dict:
    """The config (or a section) as plain nested dicts."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The config as YAML (what every stage saves beside its outputs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses, dicts or scalars)."""

    def plain(x):
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
