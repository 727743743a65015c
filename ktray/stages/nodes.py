"""Multi-node safety: local output paths on a cluster of several nodes.

Ray Train workers, Ray Data actors and Tune trials run on whichever node has room; a local
``out=`` or ``ray.storage_path`` would then be written on several disks (and read back on none
of them). :func:`check_shared_storage` stops with one line before any work when more than one
node is alive and a path is local, unless ``ray.shared_storage=true`` declares the path a mount
every node shares (NFS, ...).
"""

from __future__ import annotations

from ktray import storage
from ktray.config import RayConfig
from ktray.errors import KtrayError


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive", n.get("alive", False)))


def check_shared_storage(rc: RayConfig, out: str = "") -> None:
    """Raise :class:`KtrayError` if ``out`` or ``rc.storage_path`` is local while more than one
    node is alive (Ray must be initialised) and the user has not declared it shared."""
    if rc.shared_storage:
        return
    local = [
        (key, path)
        for key, path in (("out", out), ("ray.storage_path", rc.storage_path))
        if path and not storage.is_remote(path)
    ]
    if not local:
        return
    nodes = alive_nodes()
    if nodes > 1:
        key, path = local[0]
        raise KtrayError(
            f"{key}={path} is a local path but the Ray cluster has {nodes} nodes: "
            f"use s3:// (or gs://), or set ray.shared_storage=true if every node "
            f"mounts it"
        )
