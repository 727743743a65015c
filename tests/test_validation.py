"""Every setting is checked where it is defined; the whole config before any work starts.

A bad value of any config field stops ``ktray`` with one line (``ktray: error: KEY ...``) and
exit code 2: the invalid values are generated from the config schema itself (each field's type
and its ``setting(...)`` limits), so a new field is covered the day it is added. Then the
checks that need more than one field, the file system, object stores or model weights.
"""

import ast
import dataclasses
import os
import subprocess
import sys
import typing

import pytest
from cli_errors import one_line_error

from ktray import cli
from ktray import config as config_module
from ktray.config import Config, load_config
from ktray.errors import KtrayError

# Free-text settings: no value is wrong on its own. Paths and URIs among them are checked by
# validate.check_config (existence, object-store access) before any work.
FREE_TEXT = {
    "out",
    "teacher.checkpoint",
    "student.checkpoint",
    "curate.gallery",
    "curate.encoder",
    "ray.address",
    "ray.storage_path",
    "tracking.tracking_uri",
    "tracking.registered_model",
    "distill.targets",
    "data.root",
    "sweep.method",
}


def _fields(cls=Config, prefix=""):
    """(dotted key, type, field, is_section) of every config field, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(typ):
            yield key, typ, f, True
            yield from _fields(typ, key + ".")
        else:
            yield key, typ, f, False


FIELDS = list(_fields())


def _below(bound, also):
    v = bound - 1
    while v in also:
        v -= 1
    return v


def _invalid(key, typ, f, section):
    """(override values, fragment of the expected message) for field ``key``."""
    if section:
        return [(f"{key}=5", "is a section")]
    meta, cases = f.metadata, []
    cases.append(
        {
            bool: (f"{key}=maybe", "expects bool"),
            int: (f"{key}=abc", "expects int"),
            float: (f"{key}=abc", "expects float"),
            str: (f"{key}=[a, b]", "expects str"),
            list: (f"{key}={{a: 1}}", "expects list"),
            dict: (f"{key}=5", "expects dict"),
        }[typ]
    )
    if typ is int:
        cases.append((f"{key}=1.5", "expects int"))
    if typ is float:
        cases.append((f"{key}=.nan", "must be a finite number"))
    also = meta.get("also", ())
    if "ge" in meta:
        cases.append((f"{key}={_below(meta['ge'], also)}", f"must be >= {meta['ge']}"))
    if "gt" in meta:
        cases.append((f"{key}={meta['gt']}", f"must be > {meta['gt']}"))
    if "le" in meta:
        above = meta["le"] + (1 if typ is int else 0.5)
        cases.append((f"{key}={above}", f"must be <= {meta['le']}"))
    if "choices" in meta:
        cases.append((f"{key}=bogus", "must be one of"))
    if meta.get("nonempty"):
        cases.append((f"{key}=[]" if typ is list else f"{key}=", "must not be empty"))
    return cases


CASES = [
    (key, value, message)
    for key, typ, f, section in FIELDS
    for value, message in _invalid(key, typ, f, section)
]

CROSS = [  # rules between fields of a section, and method strings
    (
        ["data.labels_per_class=5", "data.val_per_class=5"],
        "data.val_per_class",
        "must be < data.labels_per_class (5), got 5",
    ),
    (["data.class_names=[a, a]"], "data.class_names", "has duplicates"),
    (["curate.k0=10", "curate.max_k=5"], "curate.k0", "must be <= curate.max_k (5), got 10"),
    (["curate.scales=[0]"], "curate.scales", "must be numbers in (0, 1], got [0]"),
    (["curate.scales=[]", "curate.grid=2"], "curate.scales", "must not be empty"),
    (
        ["sweep.scheduler=asha", "sweep.reduction_factor=1"],
        "sweep.reduction_factor",
        "must be >= 2 with the asha scheduler, got 1",
    ),
    (["sweep.method=bogus@in_domain"], "bogus", "unknown objective 'bogus'"),
    (["methods=[teacher, teacher]"], "methods", "lists teacher more than once"),
    (["methods=[teacher, foo]"], "foo", "unknown method 'foo'"),
    (["methods=[task@]"], "task@", "names no transfer set"),
]


@pytest.mark.parametrize(
    "key, override, message", CASES, ids=[f"{k}:{v.split('=', 1)[1]}" for k, v, _ in CASES]
)
def test_every_field_rejects_invalid_values_in_one_line(key, override, message, capsys):
    line = one_line_error(capsys, ["config", "tiny", override])
    assert key in line and message in line, line


@pytest.mark.parametrize("overrides, key, message", CROSS)
def test_rules_between_fields_are_one_line(overrides, key, message, capsys):
    line = one_line_error(capsys, ["config", "tiny", *overrides])
    assert key in line and message in line, line


def test_every_field_is_covered_by_a_check():
    """Numbers have limits; text has allowed values, must be non-empty, or is free text
    checked by validate.check_config (listed above, so a new field must be classified)."""
    for key, typ, f, section in FIELDS:
        if typ in (int, float):
            assert {"ge", "gt"} & set(f.metadata), f"{key}: a number setting without limits"
        if typ is str and not ({"choices", "nonempty"} & set(f.metadata)):
            assert key in FREE_TEXT, f"{key}: text setting with no check; give it choices"
        if not section and typ in (int, float, str) and key not in FREE_TEXT:
            assert len(_invalid(key, typ, f, section)) >= 2, f"{key}: only its type is checked"


def test_the_checks_run_when_a_section_is_built_directly():
    with pytest.raises(KtrayError, match=r"^finetune.steps must be >= 1, got -5$"):
        config_module.FinetuneConfig(steps=-5)
    with pytest.raises(KtrayError, match=r"^teacher.mode must be one of linear, partial, full"):
        config_module.TeacherConfig(mode="lin")
    assert config_module.DistillConfig(temperature=3).temperature == 3.0  # int -> float


def test_every_config_field_has_a_docstring():
    from pathlib import Path

    package = Path(config_module.__file__).parent  # ktray/config/: every module of it
    classes = [
        n
        for f in sorted(package.glob("*.py"))
        for n in ast.parse(f.read_text()).body
        if isinstance(n, ast.ClassDef)
    ]
    missing, seen = [], 0
    for cls in classes:
        if not any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
            continue
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                seen += 1
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                    and nxt.value.value.strip()
                ):
                    missing.append(f"{cls.name}.{node.target.id}")
    assert seen == len(FIELDS) and not missing, missing


def test_config_command_still_prints_the_resolved_config(capsys):
    assert cli.main(["config", "demo", "finetune.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "finetune:\n  steps: 7\n" in out and "name: demo" in out


@pytest.mark.slow
def test_subprocess_prints_one_line_and_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "ktray.cli", "config", "tiny", "finetune.steps=-5"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "ktray: error: finetune.steps must be >= 1, got -5\n"


def test_sweep_presets_are_short_deltas_of_a_base():
    for name in (
        "transfer_size",
        "temperature",
        "temperature_asha",
        "labels_per_class",
        "crops",
        "images_per_query",
    ):
        text = open(
            os.path.join(
                os.path.dirname(os.path.dirname(config_module.__file__)),
                "configs",
                "sweeps",
                f"{name}.yaml",
            )
        ).read()
        body = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert "base: demo" in body and len(body) < 25, name
        cfg, demo = load_config(f"sweeps/{name}"), load_config("demo")
        assert cfg.finetune == demo.finetune and cfg.teacher == demo.teacher  # no drift


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads `1e-3` as a string; `distill.lr=1e-3` must still be a float."""
    cfg = load_config("tiny", ["distill.lr=1e-3", "finetune.lr=2E-4"])
    assert cfg.distill.lr == 1e-3 and cfg.finetune.lr == 2e-4
    with pytest.raises(KtrayError, match="distill.lr"):
        load_config("tiny", ["distill.lr=fast"])
