"""Shared pytest fixtures.

Servers (helpers in tests/servers.py):
  s3_server      session: a real S3 server on 127.0.0.1 (SeaweedFS, else moto>=5.2.5) with an
                 empty bucket; sets AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
                 AWS_DEFAULT_REGION for the rest of the session (restored at the end). Yields a
                 servers.S3Server: .endpoint, .bucket, .fs (s3fs), .url("a/b") -> "s3://bucket/a/b",
                 .storage_options(), .pyarrow_fs(), .env().
  ray_s3         module: a local Ray whose workers have the s3_server environment.
  mlflow_server  session: `mlflow server` (sqlite backend, proxied local artifacts) on 127.0.0.1;
                 yields its tracking URI ("http://127.0.0.1:PORT").
A server that cannot start skips its tests, or fails them when KTRAY_REQUIRE_SERVERS=1 (CI):
servers.unavailable().

Markers (registered here and in pyproject.toml): `ray` (starts Ray), `servers` (needs a real
server), `slow` (> ~10 s here). Tests using the fixtures below get `ray` / `servers`
automatically; a test that starts Ray without the `ray` marker fails (check_ray_marker), so
`-m "not ray"` really runs without Ray.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow_server as mlflow_server_mod  # noqa: E402
import servers  # noqa: E402

MARKERS = {
    "ray": "starts Ray (a local cluster, Ray Data, Ray Train or Tune); slower to start",
    "servers": "needs a real server (S3 via SeaweedFS or moto, MLflow, a Ray head)",
    "slow": "takes more than ~10 s on the 2-core machine",
}
RAY_FIXTURES = {"ray_local", "ray_s3", "ray_cluster"}
SERVER_FIXTURES = {"s3_server", "mlflow_server", "ray_s3", "ray_cluster"}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    _ray_token_auth()


def _ray_token_auth() -> None:
    """Every Ray this test session starts keeps Ray's token authentication on, with a token of
    the session's own (what `ray get-auth-token --generate` writes, in a temp file), so the
    user's ~/.ray/auth_token is neither needed nor touched."""
    import os
    import secrets
    import tempfile

    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = os.path.join(tempfile.mkdtemp(prefix="ktray-test-ray-"), "auth_token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    os.environ.pop("RAY_AUTH_TOKEN", None)


def pytest_collection_modifyitems(config, items):
    """Tests that use a Ray or server fixture get the `ray` / `servers` marker."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & RAY_FIXTURES and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
        if used & SERVER_FIXTURES and item.get_closest_marker("servers") is None:
            item.add_marker(pytest.mark.servers)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()


@pytest.fixture(autouse=True)
def check_ray_marker(request):
    """Fail a test that starts Ray without the `ray` marker (the fast subset deselects
    `ray`, so an unmarked Ray test would make it slow)."""
    before = _ray_running()
    yield
    if not before and _ray_running() and request.node.get_closest_marker("ray") is None:
        pytest.fail(
            f"{request.node.nodeid} started Ray but is not marked @pytest.mark.ray", pytrace=False
        )


@pytest.fixture(autouse=True)
def keep_mlflow_tracking_env():
    """`mlflow.set_tracking_uri` / `set_experiment` (called by some tests to read results) also
    write $MLFLOW_TRACKING_URI / $MLFLOW_EXPERIMENT_ID, which ktray and MLflow read as the
    user's choice: put them back after each test so one test's store never becomes the next's."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    try:
        server = servers.start_s3_server(tmp_path_factory.mktemp("s3"))
    except servers.ServerUnavailable as e:
        servers.unavailable(str(e))
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        mp.delenv(name, raising=False)
    # Keep ~/.aws files (profiles, endpoint overrides) out of the tests.
    mp.setenv("AWS_CONFIG_FILE", str(tmp_path_factory.mktemp("aws") / "config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path_factory.mktemp("aws") / "credentials"))
    for name, value in server.env().items():
        mp.setenv(name, value)
    try:
        yield server
    finally:
        mp.undo()
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    try:
        server = mlflow_server_mod.start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    except servers.ServerUnavailable as e:
        servers.unavailable(str(e))
    try:
        yield server.uri
    finally:
        server.stop()


def start_ray(attempts: int = 3, **init_kwargs) -> None:
    """Start a local 2-CPU Ray (ktray's own ensure_ray, or ray.init(**init_kwargs)), retried:
    on a loaded machine the raylet can miss Ray's fixed 30 s registration deadline ("The current
    node timed out during startup"), which says nothing about the code under test."""
    import ray

    from ktray.config import RayConfig
    from ktray.stages.common import ensure_ray

    for attempt in range(attempts):
        try:
            if init_kwargs:
                ray.init(num_cpus=2, include_dashboard=False, **init_kwargs)
            ensure_ray(RayConfig(num_cpus=2))
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()


@pytest.fixture(scope="session")
def _ray_session():
    """The session's local Ray (2 CPUs, no dashboard, token auth on), shut down at the end."""
    import ray

    start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """The session's local Ray, running when a module starts: started again if a module
    before shut it down (``ray_s3`` and the fixtures of ``test_ddp.py`` and ``test_shards.py``
    start Rays of their own and shut them down)."""
    if not _ray_session.is_initialized():
        start_ray()
    return _ray_session


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """A local Ray started after s3_server set the AWS_* environment, so that its workers (Ray
    Data actors, Ray Train workers) reach the S3 server. A Ray started earlier in the session
    lacks that environment and is shut down first; stages start Ray again when they need it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_task(tmp_path):
    """A generated 3-class imagefolder task (train 8/class, test 4/class, 24 unlabeled)."""
    from imagegen import make_imagefolder

    return make_imagefolder(str(tmp_path / "task"))
