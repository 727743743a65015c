"""Typed settings: a field's checks declared beside it, and the YAML/override trees around them.

A dataclass field made with :func:`setting` carries its allowed values in its metadata
(``ge``, ``gt``, ``le``, ``choices``, ``nonempty``); :func:`check_fields`, called from the
dataclass's ``__post_init__``, checks every field's type and those limits and raises a
one-line :class:`~ktray.errors.KtrayError` naming the key, the value and what is allowed::

    steps: int = setting(150, ge=1)
    # FinetuneConfig(steps=-5) -> "finetune.steps must be >= 1, got -5"

``choices`` may be a tuple or a ``"module:ATTRIBUTE"`` string naming the enumeration in the
module that owns it (``"ktray.models.heads:TRAINABLE_MODES"``); it is imported only when a
value is checked, so the modules defining settings stay light.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from ktray.errors import KtrayError

_MISSING = dataclasses.MISSING
_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def setting(
    default: Any = _MISSING,
    *,
    factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Any = None,
    also: tuple = (),
    nonempty: bool = False,
) -> Any:
    """A dataclass field with its checks.

    Args:
        default: The default value (or give ``factory`` for lists and dicts).
        factory: A zero-argument callable making the default.
        ge, gt, le: Numeric limits (``>= ge``, ``> gt``, ``<= le``).
        choices: Allowed values: a tuple, or ``"module:ATTRIBUTE"`` naming one (its keys when
            it is a dict).
        also: Extra allowed values outside the limits (e.g. ``-1`` meaning "auto").
        nonempty: A string or list that must not be empty.
    """
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, choices=choices).items() if v is not None}
    meta.update({"also": tuple(also)} if also else {}, **({"nonempty": True} if nonempty else {}))
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def resolve_choices(choices: Any) -> tuple:
    """The allowed values of a ``choices`` entry (a tuple or ``"module:ATTRIBUTE"``)."""
    if isinstance(choices, str):
        module, _, attr = choices.partition(":")
        choices = getattr(importlib.import_module(module), attr)
    return tuple(choices)


def _type_ok(value: Any, typ: Any) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(typ):
        return isinstance(value, typ)
    return isinstance(value, typ) if isinstance(typ, type) else True


def check_fields(obj: Any, section: str) -> None:
    """Check every field of dataclass ``obj`` against its type and its :func:`setting` limits.

    Args:
        obj: The dataclass instance (call from its ``__post_init__``).
        section: The key prefix for messages (``"finetune"``; ``""`` for the root).

    Raises:
        KtrayError: ``finetune.steps must be >= 1, got -5`` and the like.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        value, typ, meta = getattr(obj, f.name), hints[f.name], f.metadata
        if not _type_ok(value, typ):
            word = _TYPE_WORDS.get(typ, getattr(typ, "__name__", str(typ)))
            raise KtrayError(f"{key} must be {word}, got {value!r}")
        if typ is float and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))
            value = float(value)
        if typ is float and not math.isfinite(value):
            raise KtrayError(f"{key} must be a finite number, got {value!r}")
        if meta.get("nonempty") and not value:
            raise KtrayError(f"{key} must not be empty")
        if value in meta.get("also", ()) and not isinstance(value, bool):
            continue
        if "choices" in meta:
            allowed = resolve_choices(meta["choices"])
            if value not in allowed:
                raise KtrayError(
                    f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}"
                )
        extra = "".join(f" or {a}" for a in meta.get("also", ()))
        for op, ok in (
            ("ge", lambda v, b: v >= b),
            ("gt", lambda v, b: v > b),
            ("le", lambda v, b: v <= b),
        ):
            if op in meta and not ok(value, meta[op]):
                sign = {"ge": ">=", "gt": ">", "le": "<="}[op]
                raise KtrayError(f"{key} must be {sign} {meta[op]}{extra}, got {value!r}")


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``dotted == "a.b"`` (sections created as needed)."""
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
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # e.g. a URI with braces: DIR/unl-{000..001}.tar
        set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def find_yaml(path: str, packaged_root: Path) -> Path:
    """A YAML file by path, or a packaged one by name or relative path (``demo``,
    ``sweeps/temperature``, ``configs/sweeps/temperature.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    for cand in (packaged_root / rel, packaged_root / p.name):
        for c in (cand, cand.with_suffix(".yaml")):
            if c.is_file() and c.suffix in (".yaml", ".yml"):
                return c
    names = sorted(
        str(f.relative_to(packaged_root).with_suffix("")) for f in packaged_root.rglob("*.yaml")
    )
    if "=" in str(path):  # an override where the config goes: `ktray run out=/tmp/x`
        raise KtrayError(
            f"config file not found: {path} (the first argument is the config: a YAML path or "
            f"a packaged name, {', '.join(names)}; overrides follow it, e.g. `demo {path}`)"
        )
    raise KtrayError(f"config file not found: {path} (packaged: {', '.join(names)})")


def read_yaml_tree(path: str, packaged_root: Path, _seen: tuple = ()) -> dict:
    """The mapping in a YAML config file, with its ``base:`` (another config it is a delta
    of, by path or packaged name) merged underneath."""
    p = find_yaml(path, packaged_root)
    if p.resolve() in _seen:
        raise KtrayError(f"config file {path}: 'base' chain loops back to itself")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise KtrayError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(tree, dict):
        raise KtrayError(f"config file {path} must hold a mapping at the top level")
    base = tree.pop("base", None)
    if base:
        tree = merge(read_yaml_tree(str(base), packaged_root, _seen + (p.resolve(),)), tree)
    return tree


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise KtrayError(f"config key '{key}' is a section; give it a mapping, not {value!r}")
        return build(typ, value, key + ".")
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
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if value is None:
            return ""
        if not isinstance(value, (list, tuple, dict)):
            return str(value)
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


def build(cls, values: dict, prefix: str = ""):
    """An instance of dataclass ``cls`` from a nested dict: unknown keys rejected (with the
    closest valid one), values coerced to the field types, sections built recursively."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in types:
            raise _unknown(key, sorted(types), prefix)
        kwargs[key] = _coerce(value, types[key], prefix + key)
    return cls(**kwargs)
