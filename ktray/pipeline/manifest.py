"""Stage manifests: what a finished stage wrote, and reuse of a finished earlier run.

A stage writes its outputs first and ``manifest.json`` last, so a manifest whose
``config_hash`` matches the current config proves the outputs are complete.
"""

from __future__ import annotations

import time
from typing import Any

from ktray import storage
from ktray.config import to_yaml

MANIFEST = "manifest.json"


def stage_dir(out: str, stage: str, name: str = "") -> str:
    return storage.join(out, stage, name) if name else storage.join(out, stage)


def load_finished(directory: str, config_hash: str) -> dict | None:
    """The manifest of a finished run with the same config hash, else None."""
    uri = storage.join(directory, MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        manifest = storage.read_json(uri)
    except Exception:
        return None
    return manifest if manifest.get("config_hash") == config_hash else None


def write(directory: str, manifest: dict[str, Any], cfg=None) -> dict:
    """Write the resolved config (if given) then the manifest, atomically."""
    if cfg is not None:
        storage.write_text(storage.join(directory, "config.yaml"), to_yaml(cfg))
    manifest.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    storage.write_json(storage.join(directory, MANIFEST), manifest)
    return manifest


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
