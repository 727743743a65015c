"""Lazy package exports: a package's names imported from their modules on first use.

``ktray.data`` and ``ktray.retrieval`` export names from modules that import torch or faiss;
a Ray Data decode worker imports one torch-free module of theirs (``ktray.data.decode``,
``ktray.retrieval.crops``), and an eager ``__init__`` would import everything else with it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The module ``__getattr__`` (PEP 562) of ``package``: ``exports`` maps each name to the
    module that defines it; a name is imported on first use and then kept on the package."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
