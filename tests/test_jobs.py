"""`ray job submit` of jobs/pipeline.py to a real local Ray cluster (head + job server)."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

import raycluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCLUDES = [".venv", ".git", "ktray-out", "mlruns", "*.db", ".pytest_cache", ".hypothesis"]


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        cluster = raycluster.start_ray_cluster(num_cpus=2)
    except raycluster.ServerUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not raycluster.session_pids(cluster.proc.pid)


def submit(cluster, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    cmd = [raycluster.RAY, "job", "submit", "--address", cluster.dashboard,
           "--submission-id", submission_id, "--working-dir", REPO,
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait",
           "--", *entrypoint]
    return subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=120)


def test_pipeline_job_on_a_ray_cluster(ray_cluster, tiny_task, tmp_path):
    out = str(tmp_path / "out")
    sid = f"ktray-test-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    r = submit(ray_cluster, sid, "python", "jobs/pipeline.py", "tiny",
               f"data.root={tiny_task}", f"out={out}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    info = ray_cluster.wait_job(sid, timeout=240)
    seconds = time.perf_counter() - start
    logs = ray_cluster.job_logs(sid)
    print(f"\njob submit -> SUCCEEDED: {seconds:.1f}s (cluster start {ray_cluster.start_seconds:.1f}s)")
    assert info.get("status") == "SUCCEEDED", f"{info.get('status')}: {info.get('message')}\n" \
        + logs[-4000:]
    # the job ran the venv's python and the uploaded copy of ktray, joined to the cluster
    assert f"python {sys.executable}" in logs, logs[:2000]
    assert "runtime_resources" in logs.split("  ktray ", 1)[1].split("\n", 1)[0], logs[:2000]
    assert f":{ray_cluster.gcs_port}" in logs.split("  ray ", 1)[1].split("\n", 1)[0]
    assert "done in" in logs
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["methods"]) == {"teacher", "scratch", "task@in_domain"}
    for stage in ("data", "teacher", "logits/in_domain", "distill/task@in_domain",
                  "finetune/scratch", "finetune/task@in_domain", "pipeline"):
        m = json.load(open(os.path.join(out, stage, "manifest.json")))
        assert m["stage"] == stage.split("/")[0], stage
    assert json.load(open(os.path.join(out, "logits", "in_domain", "manifest.json")))["rows"] == 48


def test_bad_config_job_fails_with_one_line_error(ray_cluster, tmp_path):
    sid = f"ktray-test-{uuid.uuid4().hex[:8]}"
    r = submit(ray_cluster, sid, "python", "jobs/pipeline.py", "tiny",
               f"data.root={tmp_path}/missing", f"out={tmp_path}/out")
    assert r.returncode == 0, r.stderr[-2000:]
    info = ray_cluster.wait_job(sid, timeout=120)
    logs = ray_cluster.job_logs(sid)
    assert info.get("status") == "FAILED", logs[-2000:]
    assert f"ktray: error: data.root not found: {tmp_path}/missing" in logs
    assert "Traceback" not in logs
