"""Smoke tests of the test servers (tests/servers.py, fixtures in tests/conftest.py)."""

from __future__ import annotations

import os
import uuid

import pytest


def _key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------- S3


def test_s3_env_points_at_server(s3_server):
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    assert os.environ["AWS_DEFAULT_REGION"] == s3_server.region
    assert s3_server.endpoint.startswith("http://127.0.0.1:")


def test_s3fs_roundtrip(s3_server):
    fs = s3_server.fs
    path = s3_server.url(_key("s3fs"), "hello.txt")
    fs.pipe(path, b"hello ktray")
    assert fs.cat(path) == b"hello ktray"
    assert fs.size(path) == len(b"hello ktray")
    with fs.open(path, "rb") as f:
        assert f.read(5) == b"hello"
    fs.rm(path)
    assert not fs.exists(path)


def test_s3fs_from_env_only(s3_server):
    """Code that builds its own filesystem from the environment (as ktray.storage / fsspec.open
    with an s3:// URI do) reaches the server."""
    import fsspec

    path = s3_server.url(_key("env"), "x.bin")
    with fsspec.open(path, "wb", skip_instance_cache=True) as f:
        f.write(b"\x00\x01\x02")
    with fsspec.open(path, "rb", skip_instance_cache=True) as f:
        assert f.read() == b"\x00\x01\x02"


def test_pyarrow_parquet_roundtrip(s3_server):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    # ~12 MB of incompressible data: forces a multipart upload (the path moto 5.2.1 broke).
    n = 1_500_000
    table = pa.table({"x": rng.random(n), "i": np.arange(n, dtype=np.int64)})
    prefix = _key("pq")

    # 1) explicit pyarrow S3FileSystem(endpoint_override=...)
    pafs = s3_server.pyarrow_fs()
    pq.write_table(table, f"{s3_server.bucket}/{prefix}/a.parquet", filesystem=pafs)
    assert pq.read_table(f"{s3_server.bucket}/{prefix}/a.parquet", filesystem=pafs).equals(table)

    # 2) a bare s3:// URI: pyarrow resolves the endpoint from AWS_ENDPOINT_URL (as Ray Data does)
    small = table.slice(0, 1000)
    pq.write_table(small, s3_server.url(prefix, "b.parquet"))
    assert pq.read_table(s3_server.url(prefix, "b.parquet")).equals(small)

    # 3) through fsspec / s3fs
    pq.write_table(small, s3_server.url(prefix, "c.parquet"), filesystem=s3_server.fs)
    assert pq.read_table(s3_server.url(prefix, "c.parquet"), filesystem=s3_server.fs).equals(small)
    s3_server.fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in s3_server.fs.ls(s3_server.url(prefix))) == [
        "a.parquet",
        "b.parquet",
        "c.parquet",
    ]


def test_s3_wrong_secret_rejected(s3_server):
    if s3_server.kind == "moto":
        pytest.skip("moto accepts any credentials")
    path = s3_server.url(_key("auth"), "secret.txt")
    s3_server.fs.pipe(path, b"x")
    bad = s3_server.make_fs(secret="not-the-secret")
    with pytest.raises((PermissionError, OSError)):
        bad.cat(path)
    with pytest.raises((PermissionError, OSError)):
        bad.pipe(s3_server.url(_key("auth"), "intruder.txt"), b"y")


# ------------------------------------------------------------------------------------ MLflow


def test_mlflow_server_roundtrip(mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    exp_id = client.create_experiment(_key("ktray-smoke"))
    run = client.create_run(exp_id)
    run_id = run.info.run_id
    client.log_param(run_id, "student", "resnet18")
    for step, value in enumerate([1.0, 0.5, 0.25]):
        client.log_metric(run_id, "loss", value, step=step)
    art = tmp_path / "report.md"
    art.write_text("# ktray\n")
    client.log_artifact(run_id, str(art), artifact_path="report")
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.data.params == {"student": "resnet18"}
    assert got.data.metrics["loss"] == 0.25
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 0.25]
    assert [f.path for f in client.list_artifacts(run_id, "report")] == ["report/report.md"]
    local = client.download_artifacts(run_id, "report/report.md", str(tmp_path / "dl"))
    assert open(local).read() == "# ktray\n"
    # artifacts are proxied by the server (mlflow-artifacts:/), not written by the client
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")

    # model registry: a version whose source is the run's artifact directory
    name = _key("ktray-student")
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"{got.info.artifact_uri}/report", run_id=run_id)
    assert mv.version == "1"
    assert client.get_model_version(name, "1").run_id == run_id
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == ["1"]

    # the fluent API against the same server
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(mlflow_server)
    try:
        with mlflow.start_run(experiment_id=exp_id) as r:
            mlflow.log_metric("acc", 0.9)
        assert MlflowClient(mlflow_server).get_run(r.info.run_id).data.metrics == {"acc": 0.9}
    finally:
        mlflow.set_tracking_uri(previous)
