"""Stage manifests: what a finished stage wrote, and reuse of a finished earlier run.

A stage writes its outputs first and ``manifest.json`` last, so a manifest whose
``config_hash`` matches the current config proves the outputs are complete.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from ktray import storage
from ktray.config import to_yaml

MANIFEST = "manifest.json"


def path_name(name: str) -> str:
    """The folder name of a stage output called ``name``: the name itself, or, when it holds a
    path or URI (a transfer set given as ``/data/unl-{000..009}.tar``, or ``task@`` that), a
    short stable name: the last two path parts, cleaned, plus 8 hex digits of the whole name's
    hash (``task@data-unl-_000..009_.tar-1a2b3c4d``)."""
    if re.fullmatch(r"[\w@.+=~-]+", name):  # (~: a replicate's seed, ``task@x~seed1``)
        return name
    head, sep, rest = name.partition("@") if "@" in name.split("/")[0] else ("", "", name)
    parts = [p for p in rest.split("/") if p and not p.endswith(":")][-2:]
    stem = re.sub(r"[^\w.+=-]+", "_", "-".join(parts)).strip("_")[-40:]
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{head}{sep}{stem or 'uri'}-{digest}"


def stage_dir(out: str, stage: str, name: str = "") -> str:
    """``OUT/<stage>[/<path_name(name)>]``."""
    return storage.join(out, stage, path_name(name)) if name else storage.join(out, stage)


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
