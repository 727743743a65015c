"""Method names: ``teacher``, ``scratch`` or ``OBJECTIVE@TRANSFER``."""

from __future__ import annotations

from ktray.errors import KtrayError
from ktray.settings import resolve_choices

BASELINES = ("teacher", "scratch")
"""Methods that need no transfer set (``OBJECTIVE@TRANSFER`` is the other form)."""


def parse_method(method: str) -> tuple[str, str]:
    """``"task@generic"`` -> ("task", "generic"); ``"scratch"``/``"teacher"`` -> (name, "")."""
    if method in BASELINES:
        return method, ""
    if not isinstance(method, str) or "@" not in method:
        raise KtrayError(
            f"unknown method '{method}': use teacher, scratch or "
            "OBJECTIVE@TRANSFER (e.g. task@in_domain)"
        )
    objective, transfer = method.split("@", 1)
    objectives = resolve_choices("ktray.distill:OBJECTIVES")
    if objective not in objectives:
        raise KtrayError(
            f"unknown objective '{objective}' in method '{method}'; valid: {', '.join(objectives)}"
        )
    if not transfer:
        raise KtrayError(f"method '{method}' names no transfer set after '@'")
    return objective, transfer
