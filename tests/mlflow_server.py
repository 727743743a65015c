"""A real MLflow tracking server for tests: `mlflow server` with a sqlite backend on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

from servers import ServerUnavailable, _clean_env, _http_get, _wait_until, free_port, stop_process


@dataclasses.dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    workdir: Path
    start_seconds: float
    proc: subprocess.Popen = dataclasses.field(repr=False)
    stop_seconds: float | None = None

    def stop(self) -> float:
        if self.stop_seconds is None:
            self.stop_seconds = stop_process(self.proc, timeout=20.0)
        return self.stop_seconds


def find_mlflow() -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    return [sys.executable, "-m", "mlflow"]


def start_mlflow_server(workdir: Path, timeout: float = 120.0) -> MlflowServer:
    """`mlflow server` with sqlite:///WORKDIR/mlflow.db and artifacts proxied to
    WORKDIR/artifacts, one uvicorn worker, job execution off (it would spawn huey consumers
    that outlive the server)."""
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        raise ServerUnavailable(f"mlflow not installed ({e})") from e
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "mlflow-server.log"
    last_error: Exception | None = None
    for _attempt in range(2):
        t0 = time.monotonic()
        port = free_port()
        cmd = [
            *find_mlflow(), "server",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",
        ]  # fmt: skip
        env = _clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        uri = f"http://127.0.0.1:{port}"
        try:
            _wait_until(
                lambda uri=uri: _http_get(uri + "/health")[0] == 200,
                timeout,
                proc,
                "mlflow server",
                log,
            )
        except ServerUnavailable as e:
            last_error = e
            stop_process(proc, timeout=10.0)
            continue
        return MlflowServer(
            uri=uri, workdir=workdir, start_seconds=time.monotonic() - t0, proc=proc
        )
    raise ServerUnavailable(f"mlflow server did not start: {last_error}")
