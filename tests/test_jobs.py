"""`ray job submit` of jobs/pipeline.py to a real local Ray cluster (head + job server), with
Ray's token authentication on (a token of the test cluster's own, via RAY_AUTH_TOKEN_PATH)."""

import json
import os
import shutil
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
        raycluster.unavailable(str(e))  # a failure under KTRAY_REQUIRE_SERVERS=1
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not raycluster.session_pids(cluster.proc.pid)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def submit(cluster, submission_id: str, *entrypoint: str) -> subprocess.Popen:
    """Start `ray job submit --no-wait` (returns once the job is accepted)."""
    cmd = [
        raycluster.RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--submission-id",
        submission_id,
        "--working-dir",
        REPO,
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--no-wait",
        "--",
        *entrypoint,
    ]
    return subprocess.Popen(
        cmd, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def accepted(proc: subprocess.Popen) -> None:
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]


def test_cluster_requires_its_auth_token(ray_cluster):
    """The test cluster runs with Ray's token authentication (RAY_AUTH_TOKEN_PATH -> a token
    of its own): the job server refuses a request without the token."""
    import urllib.error
    import urllib.request

    assert ray_cluster.env()["RAY_AUTH_MODE"] == "token"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{ray_cluster.dashboard}/api/jobs/", timeout=10)
    assert e.value.code in (401, 403)
    assert ray_cluster.get("/api/jobs/")[0] == 200


def test_pipeline_job_on_a_ray_cluster(ray_cluster, tiny_task, tmp_path):
    out = str(tmp_path / "out")
    good, bad = (f"ktray-test-{uuid.uuid4().hex[:8]}" for _ in range(2))
    # a job with bad input, running beside the real one: FAILED with the one-line error
    start = time.perf_counter()
    submits = [
        submit(
            ray_cluster,
            bad,
            "python",
            "jobs/pipeline.py",
            "tiny",
            f"data.root={tmp_path}/missing",
            f"out={tmp_path}/bad",
        ),
        submit(
            ray_cluster,
            good,
            "python",
            "jobs/pipeline.py",
            "tiny",
            f"data.root={tiny_task}",
            f"out={out}",
        ),
    ]
    for proc in submits:
        accepted(proc)
    info = ray_cluster.wait_job(good, timeout=420)  # a loaded 2-core machine is slow
    seconds = time.perf_counter() - start
    logs = ray_cluster.job_logs(good)
    print(
        f"\njob submit -> SUCCEEDED: {seconds:.1f}s "
        f"(cluster start {ray_cluster.start_seconds:.1f}s)"
    )
    assert info.get("status") == "SUCCEEDED", (
        f"{info.get('status')}: {info.get('message')}\n" + logs[-4000:]
    )
    # the job ran the venv's python and the uploaded copy of ktray, joined to the cluster
    assert f"python {sys.executable}" in logs, logs[:2000]
    assert "runtime_resources" in logs.split("  ktray ", 1)[1].split("\n", 1)[0], logs[:2000]
    assert f":{ray_cluster.gcs_port}" in logs.split("  ray ", 1)[1].split("\n", 1)[0]
    assert "done in" in logs
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["methods"]) == {"teacher", "scratch", "task@in_domain"}
    for stage in (
        "data",
        "teacher",
        "logits/in_domain",
        "distill/task@in_domain",
        "finetune/scratch",
        "finetune/task@in_domain",
        "pipeline",
    ):
        m = json.load(open(os.path.join(out, stage, "manifest.json")))
        assert m["stage"] == stage.split("/")[0], stage
    assert json.load(open(os.path.join(out, "logits", "in_domain", "manifest.json")))["rows"] == 48

    info = ray_cluster.wait_job(bad, timeout=60)
    logs = ray_cluster.job_logs(bad)
    assert info.get("status") == "FAILED", logs[-2000:]
    assert f"ktray: error: data.root not found: {tmp_path}/missing" in logs
    assert "Traceback" not in logs and not os.path.exists(f"{tmp_path}/bad")
