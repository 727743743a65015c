"""A real local Ray cluster for tests: `ray start --head` in its own session, on free ports.

Never `ray stop`: it kills every Ray process on the machine, other users' included. The head is
started with start_new_session=True, so every process of this cluster (gcs, raylet, dashboard,
workers, job drivers) carries its session id; stop() signals exactly those processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from servers import ServerUnavailable, _wait_until, free_port, unavailable  # noqa: F401

VENV_BIN = str(Path(sys.executable).parent)
RAY = os.path.join(VENV_BIN, "ray")


@dataclasses.dataclass
class RayCluster:
    dashboard: str  # http://127.0.0.1:PORT (the job server)
    gcs_port: int
    temp_dir: str
    proc: subprocess.Popen
    start_seconds: float

    @property
    def token_path(self) -> str:
        """This cluster's own Ray auth token (as `ray get-auth-token --generate` makes one),
        in its temp dir: token authentication stays on, the user's ~/.ray token untouched."""
        path = os.path.join(self.temp_dir, "auth_token")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path

    def env(self) -> dict[str, str]:
        """Environment for `ray start` / `ray job ...` commands aimed at this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=self.token_path,
            RAY_USAGE_STATS_ENABLED="0",
            PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        )
        return env

    def get(self, path: str, timeout: float = 10):
        """GET on the dashboard's HTTP API with this cluster's token."""
        token = open(self.token_path).read().strip()
        request = urllib.request.Request(
            f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()

    def job(self, submission_id: str) -> dict:
        return json.loads(self.get(f"/api/jobs/{submission_id}")[1])

    def job_logs(self, submission_id: str) -> str:
        return json.loads(self.get(f"/api/jobs/{submission_id}/logs")[1]).get("logs", "")

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        """Poll the job server until the job is SUCCEEDED / FAILED / STOPPED."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(submission_id)
            if info.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited with code {self.proc.returncode}")
            time.sleep(1.0)
        return info

    def stop(self, grace: float = 3.0) -> float:
        """SIGTERM then SIGKILL every process of this cluster's session; returns seconds."""
        t0 = time.monotonic()
        sid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            pids = session_pids(sid)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and session_pids(sid):
                if self.proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=0.1)
                time.sleep(0.2)
            if not session_pids(sid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return time.monotonic() - t0


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry))
    return pids


def start_ray_cluster(num_cpus: int = 2, timeout: float = 90.0) -> RayCluster:
    """`ray start --head --block` bound to 127.0.0.1 with the dashboard (job server) on."""
    temp_dir = tempfile.mkdtemp(prefix="krt", dir="/tmp")  # short: unix socket paths
    log = Path(temp_dir) / "ray-start.log"
    t0 = time.monotonic()
    used: set[int] = set()

    def port() -> int:
        p = free_port(avoid=used)
        used.add(p)
        return p

    gcs, dash = port(), port()
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={port()}",
        f"--dashboard-agent-grpc-port={port()}",
        f"--ray-client-server-port={port()}",
        f"--metrics-export-port={port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    cluster = RayCluster(
        dashboard=f"http://127.0.0.1:{dash}",
        gcs_port=gcs,
        temp_dir=temp_dir,
        proc=None,
        start_seconds=0.0,
    )  # type: ignore[arg-type]
    with open(log, "wb") as out:
        cluster.proc = subprocess.Popen(
            cmd,
            env=cluster.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def ready() -> bool:
        return cluster.get("/api/version", timeout=2)[0] == 200

    try:
        _wait_until(ready, timeout, cluster.proc, "ray start", log)
    except ServerUnavailable:
        cluster.stop()
        raise
    cluster.start_seconds = time.monotonic() - t0
    return cluster
