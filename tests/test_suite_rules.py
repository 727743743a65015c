"""The suite's own rules: markers exist, and a server that cannot start skips its tests on a
developer machine but fails them in CI (KTRAY_REQUIRE_SERVERS=1)."""

import pytest
import servers


def test_markers_are_registered(pytestconfig):
    names = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert {"ray", "servers", "slow"} <= names


def test_unavailable_server_skips_by_default(monkeypatch):
    monkeypatch.delenv(servers.REQUIRE_ENV, raising=False)
    with pytest.raises(BaseException) as outcome:  # (pytest's outcomes are BaseExceptions)
        servers.unavailable("no weed")
    assert outcome.type is pytest.skip.Exception and "no weed" in str(outcome.value)


def test_unavailable_server_fails_when_servers_are_required(monkeypatch):
    monkeypatch.setenv(servers.REQUIRE_ENV, "1")
    with pytest.raises(BaseException) as outcome:
        servers.unavailable("no weed")
    assert outcome.type is pytest.fail.Exception
    assert "KTRAY_REQUIRE_SERVERS=1" in str(outcome.value) and "no weed" in str(outcome.value)


def test_server_fixtures_route_failures_through_unavailable():
    """conftest's and test_jobs' server fixtures call servers.unavailable, not pytest.skip."""
    import ast
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    wanted = {"conftest.py": {"s3_server", "mlflow_server"}, "test_jobs.py": {"ray_cluster"}}
    for name, fixtures in wanted.items():
        with open(os.path.join(here, name)) as f:
            text = f.read()
        found = {}
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name in fixtures:
                found[node.name] = ast.get_source_segment(text, node)
        assert set(found) == fixtures, name
        for fixture, src in found.items():
            assert "unavailable(" in src and "pytest.skip(" not in src, fixture
