"""Shared pytest fixtures.

Servers (helpers in tests/servers.py):
  s3_server      session: a real S3 server on 127.0.0.1 (SeaweedFS, else moto>=5.2.5) with an
                 empty bucket; sets AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
                 AWS_DEFAULT_REGION for the rest of the session (restored at the end). Yields a
                 servers.S3Server: .endpoint, .bucket, .fs (s3fs), .url("a/b") -> "s3://bucket/a/b",
                 .storage_options(), .pyarrow_fs(), .env(). Skips if no S3 server can start.
  ray_s3         module: a local Ray whose workers have the s3_server environment.
  mlflow_server  session: `mlflow server` (sqlite backend, proxied local artifacts) on 127.0.0.1;
                 yields its tracking URI ("http://127.0.0.1:PORT"). Skips if it cannot start.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow_server as mlflow_server_mod  # noqa: E402
import servers  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    try:
        server = servers.start_s3_server(tmp_path_factory.mktemp("s3"))
    except servers.ServerUnavailable as e:
        pytest.skip(str(e))
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
        pytest.skip(str(e))
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard, token auth off)."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from ktray.config import RayConfig
    from ktray.stages.common import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """A local Ray started after s3_server set the AWS_* environment, so that its workers (Ray
    Data actors, Ray Train workers) reach the S3 server. A Ray started earlier in the session
    lacks that environment and is shut down first; stages start Ray again when they need it."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from ktray.config import RayConfig
    from ktray.stages.common import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_task(tmp_path):
    """A generated 3-class imagefolder task (train 8/class, test 4/class, 24 unlabeled)."""
    from imagegen import make_imagefolder

    return make_imagefolder(str(tmp_path / "task"))
