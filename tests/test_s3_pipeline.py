"""ktray with its data, outputs and Ray Train storage on a real S3 server (SeaweedFS / moto)."""

import json
import os
import time

import pytest

from ktray import cli, io


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """A local Ray started after the S3 environment is set: its workers (Ray Data actors, Ray
    Train workers) inherit AWS_ENDPOINT_URL and the keys. An earlier test's Ray would not
    have them, so it is shut down first (stages start Ray again when they need it)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from ktray.config import RayConfig
    from ktray.stages.common import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_task(s3_server, tmp_path_factory):
    from imagegen import make_imagefolder

    local = make_imagefolder(str(tmp_path_factory.mktemp("s3task") / "task"))
    s3_server.fs.put(local + "/", f"{s3_server.bucket}/task/", recursive=True)
    return s3_server.url("task")


def test_tiny_pipeline_on_s3(s3_server, s3_task, s3_ray, tmp_path, monkeypatch, capsys):
    fs = s3_server.fs
    out, storage = s3_server.url("out"), s3_server.url("ray")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = cli.main(["run", "tiny", f"data.root={s3_task}", f"out={out}",
                     f"ray.storage_path={storage}"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ns3 pipeline: {seconds:.1f}s")
    assert code == 0, err[-3000:]
    fs.invalidate_cache()
    results = json.loads(fs.cat(f"{s3_server.bucket}/out/results.json"))
    assert set(results["methods"]) == {"teacher", "scratch", "task@in_domain"}
    assert results["models"]["task@in_domain"].startswith("s3://")
    for name in ("results.md", "results.png", "data/manifest.json", "teacher/manifest.json",
                 "logits/in_domain/manifest.json", "distill/task@in_domain/manifest.json",
                 "finetune/scratch/manifest.json", "finetune/task@in_domain/manifest.json",
                 "teacher/model/model.safetensors", "distill/task@in_domain/model/model.json",
                 "finetune/task@in_domain/model/model.safetensors", "pipeline/manifest.json"):
        assert fs.exists(f"{s3_server.bucket}/out/{name}"), name
    assert fs.glob(f"{s3_server.bucket}/out/logits/in_domain/part-*.parquet")
    table = io.read_parquet(s3_server.url("out", "logits", "in_domain"))
    keys = set(zip(table["image_id"].to_pylist(), table["view"].to_pylist()))
    assert table.num_rows == len(keys) == 48
    assert not [p for p in fs.find(f"{s3_server.bucket}/out") if ".tmp-" in p]
    # nothing written locally: the working directory stays empty
    assert os.listdir(tmp_path) == []


def test_ray_train_worker_checkpoints_on_s3(s3_server, s3_task, s3_ray, tmp_path, monkeypatch,
                                            capsys):
    """A real Ray Train worker (not local mode) with RunConfig(storage_path="s3://..."):
    pyarrow finds the endpoint in AWS_ENDPOINT_URL(_S3); no storage_filesystem is needed."""
    fs = s3_server.fs
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = cli.main(["finetune", "tiny", f"data.root={s3_task}",
                     f"out={s3_server.url('out-workers')}", "ray.num_workers=1",
                     f"ray.storage_path={s3_server.url('ray-workers')}",
                     "finetune.scratch_steps=6"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ns3 Ray Train worker run: {seconds:.1f}s")
    assert code == 0, err[-3000:]
    fs.invalidate_cache()
    run = f"{s3_server.bucket}/ray-workers/finetune-scratch"
    assert fs.exists(f"{run}/checkpoint_manager_snapshot.json")
    assert fs.glob(f"{run}/checkpoint_*/state.pt")
    m = json.loads(fs.cat(f"{s3_server.bucket}/out-workers/finetune/scratch/manifest.json"))
    assert m["steps"] == 6 and m["flops"] > 0 and m["history"][-1]["step"] == 6
    assert os.listdir(tmp_path) == []
