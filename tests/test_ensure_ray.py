"""Joining or starting Ray (``ktray.stages.common.ensure_ray``)."""

from __future__ import annotations

import ray


def test_a_local_ray_for_worker_groups_starts_the_dashboard_its_state_api_needs(monkeypatch):
    """Ray Train's placement-group cleaner polls the State API (served by the dashboard) in
    every worker-group run; without it, it logs a warning every second or so. A local Ray that
    ktray starts gets the dashboard only when the run has workers (local mode keeps ~0.9 GiB)."""
    from ktray.config.running import RayConfig
    from ktray.stages.common import ensure_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ensure_ray(RayConfig(num_cpus=2))
    ensure_ray(RayConfig(num_cpus=2, num_workers=2))
    assert [c["include_dashboard"] for c in calls] == [False, True]
    assert [c["num_cpus"] for c in calls] == [2, 2]
    # a new local Ray even when `ray start` left a cluster on this machine (plain ray.init()
    # would join that one)
    assert [c["address"] for c in calls] == ["local", "local"]
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ensure_ray(RayConfig(num_cpus=2))
    assert calls[-1]["address"] == "ray://head:10001" and "num_cpus" not in calls[-1]
