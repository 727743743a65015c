"""Typed train specs: built from the config, round-tripped to workers, and the source of
both the stage reuse keys and the sweep sharing rules."""

import dataclasses

import pytest

from ktray.config import Config, apply_overrides, config_hash, load_config, to_dict
from ktray.errors import KtrayError
from ktray.pipeline import sweeps
from ktray.train.specs import (
    DistillSpec,
    FinetuneSpec,
    TeacherSpec,
    config_keys,
    from_dict,
    resolve_precision,
)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("params",):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _other(value):
    """A different valid-looking value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 1.5 + 0.25
    if isinstance(value, str):
        return {
            "auto": "bf16",
            "task": "features",
            "precomputed": "online",
            "cosine": "mse",
            "linear": "partial",
            "full": "linear",
            "stored": "consistent",
            "best_val": "last",
        }.get(value, value + "x")
    if isinstance(value, list):
        return value + value[:1] if value else ["x"]
    return None


BUILDERS = {
    "teacher": lambda c: TeacherSpec.from_config(c, train_rows=40),
    "teacher.linear": lambda c: TeacherSpec.from_config(
        apply_overrides(c, {"teacher.mode": "linear"}) if c.teacher.mode == "full" else c, 40
    ),
    "teacher.partial": lambda c: TeacherSpec.from_config(
        apply_overrides(c, {"teacher.mode": "partial"}) if c.teacher.mode == "full" else c, 40
    ),
    "distill.default": lambda c: DistillSpec.from_config(c),  # distill.objective
    "distill.task": lambda c: DistillSpec.from_config(c, "task"),
    "distill.features": lambda c: DistillSpec.from_config(c, "features"),
    "distill.contrastive": lambda c: DistillSpec.from_config(
        apply_overrides(c, {"distill.feature_loss": "contrastive"}), "features"
    ),
    "finetune.init": lambda c: FinetuneSpec.from_config(c, scratch=False),
    "finetune.scratch": lambda c: FinetuneSpec.from_config(c, scratch=True),
}
CLASS = {"teacher": TeacherSpec, "distill": DistillSpec, "finetune": FinetuneSpec}


def _perturbed():
    """(key, config with that key changed, the config it differs from). A key valid only with
    an online teacher (distill.augment, distill.mixup) is changed on an online config."""
    base = load_config("tiny")
    online = apply_overrides(base, {"distill.teacher_mode": "online"})
    for key, value in _leaves(to_dict(base)).items():
        new = _other(value)
        if new is None or key.startswith("sweep."):
            continue
        for ref in (base, online):
            try:
                yield key, apply_overrides(ref, {key: new}), ref
                break
            except KtrayError:
                continue  # a checked field whose perturbation is invalid (here)
    # keys only a segmentation task reads (data.kind=segfolder: tests/test_segmentation.py)
    seg = apply_overrides(base, {"data.kind": "segfolder"})
    yield "data.kind", seg, base
    for key, value in (
        ("data.ignore_index", 0),
        ("teacher.head", "light"),
        ("student.head", "deeplabv3"),
        ("logits.dense_size", 4),
        ("logits.dense_feature_size", 2),
    ):
        yield key, apply_overrides(seg, {key: value}), seg


def test_a_spec_changes_only_with_the_keys_it_declares_and_with_each_of_them():
    """Soundness (a key a spec does not declare never changes it: sweep sharing and reuse
    may rely on it) and completeness (every declared key changes some spec)."""
    changed: dict[str, set] = {name: set() for name in BUILDERS}
    for key, cfg, ref in _perturbed():
        for name, build in BUILDERS.items():
            if build(cfg) != build(ref):
                cls = CLASS[name.split(".")[0]]
                assert key in config_keys(cls), f"{key} changes {name} but is not declared"
                changed[name].add(key)
    for kind, cls in CLASS.items():
        seen = set().union(*(v for k, v in changed.items() if k.startswith(kind)))
        assert seen == config_keys(cls), (kind, config_keys(cls) - seen)
    # the slips: test_limit no longer reaches the teacher; each loss has its own temperature
    assert "data.test_limit" not in config_keys(TeacherSpec)
    assert "distill.feature_temperature" in changed["distill.contrastive"]
    assert "distill.feature_temperature" not in changed["distill.task"]
    assert "distill.temperature" not in changed["distill.contrastive"]


def test_sweep_sharing_follows_the_teacher_spec(monkeypatch):
    """Every key that changes the teacher spec makes the sweep retrain the teacher; a key that
    does not (a distill setting, data.test_limit) keeps it shared."""
    monkeypatch.setattr(sweeps, "check_config", lambda cfg: None)
    base = load_config("tiny", ["sweep.method=task@in_domain"])
    build = BUILDERS["teacher"]
    for key, cfg, ref in _perturbed():
        rules = sweeps.shared_stages(base, [sweeps.Param(key, "grid", [1])])
        if build(cfg) != build(ref):
            assert not rules["teacher"], f"sweeping {key} would reuse a stale teacher"
    for key in (
        "data.test_limit",
        "distill.temperature",
        "distill.feature_temperature",
        "finetune.lr",
        "data.unlabeled_limit",
    ):
        assert sweeps.shared_stages(base, [sweeps.Param(key, "grid", [1])])["teacher"], key


def test_specs_round_trip_through_asdict_and_hash_stably():
    cfg = load_config("tiny", ["distill.feature_loss=contrastive"])
    for spec in (
        TeacherSpec.from_config(cfg, 24),
        DistillSpec.from_config(cfg, "features"),
        FinetuneSpec.from_config(cfg, scratch=True),
    ):
        d = dataclasses.asdict(spec)
        assert from_dict(d) == spec and config_hash(from_dict(d)) == config_hash(spec)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.seed = 5  # type: ignore[misc]


def test_values_of_the_fixed_slips():
    cfg = load_config("tiny", ["teacher.epochs=30", "teacher.batch_size=16"])
    t = TeacherSpec.from_config(cfg, train_rows=100)
    assert t.steps == 30 * 7 and t.warmup_steps == t.steps // 20 == 10  # steps, not epochs
    d = DistillSpec.from_config(
        apply_overrides(cfg, {"distill.feature_loss": "contrastive"}), "features"
    )
    assert d.loss == "contrastive" and d.temperature == 0.1
    assert DistillSpec.from_config(cfg, "task").temperature == 2.0
    assert DistillSpec.from_config(cfg, "features").temperature is None  # cosine: none
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("train.precision", "fp16", "one of auto, bf16, fp32"),
        ("train.checkpoint_every", 0, ">= 1"),
        ("train.shuffle_buffer", -1, ">= 0"),
        ("distill.feature_temperature", 0, "> 0"),
    ],
)
def test_train_settings_are_checked(key, value, match):
    with pytest.raises(KtrayError, match=f"{key}.*{match}"):
        apply_overrides(Config(), {key: value})
