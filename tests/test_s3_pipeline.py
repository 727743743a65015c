"""The tiny pipeline with its data and every output on a real S3 server (SeaweedFS / moto).

(Its stages train in Train V2 local mode, which keeps no Ray Train storage; real Ray Train
workers with ``ray.storage_path=s3://...`` are in test_fault_tolerance.py.)
"""

import json
import os
import time

import pytest

from ktray import cli, storage


@pytest.fixture(scope="module")
def s3_task(s3_server, tmp_path_factory):
    from imagegen import make_imagefolder

    local = make_imagefolder(str(tmp_path_factory.mktemp("s3task") / "task"))
    s3_server.fs.put(local + "/", f"{s3_server.bucket}/task/", recursive=True)
    return s3_server.url("task")


def test_tiny_pipeline_on_s3(
    s3_server, s3_task, ray_s3, tmp_path, tmp_path_factory, monkeypatch, capsys
):
    fs = s3_server.fs
    out, ray_storage = s3_server.url("out"), s3_server.url("ray")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = cli.main(
        ["run", "tiny", f"data.root={s3_task}", f"out={out}", f"ray.storage_path={ray_storage}"]
    )
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ns3 pipeline: {seconds:.1f}s")
    assert code == 0, err[-3000:]
    fs.invalidate_cache()
    results = json.loads(fs.cat(f"{s3_server.bucket}/out/results.json"))
    assert set(results["methods"]) == {"teacher", "scratch", "task@in_domain"}
    assert results["models"]["task@in_domain"].startswith("s3://")
    for name in (
        "results.md",
        "results.png",
        "data/manifest.json",
        "teacher/manifest.json",
        "logits/in_domain/manifest.json",
        "distill/task@in_domain/manifest.json",
        "finetune/scratch/manifest.json",
        "finetune/task@in_domain/manifest.json",
        "teacher/model/model.safetensors",
        "distill/task@in_domain/model/model.json",
        "finetune/task@in_domain/model/model.safetensors",
        "pipeline/manifest.json",
    ):
        assert fs.exists(f"{s3_server.bucket}/out/{name}"), name
    assert fs.glob(f"{s3_server.bucket}/out/logits/in_domain/part-*.parquet")
    table = storage.read_parquet(s3_server.url("out", "logits", "in_domain"))
    keys = set(zip(table["image_id"].to_pylist(), table["view"].to_pylist()))
    assert table.num_rows == len(keys) == 48
    assert not [p for p in fs.find(f"{s3_server.bucket}/out") if ".tmp-" in p]
    # nothing written locally: the working directory stays empty
    assert os.listdir(tmp_path) == []
    # MLflow logs remote results and checkpoints from local copies
    from ktray.pipeline.tracking import _local_copy

    copies = tmp_path_factory.mktemp("copies")
    model = _local_copy(results["models"]["task@in_domain"], str(copies))
    assert sorted(os.listdir(model)) == ["model.json", "model.safetensors"]
    assert json.load(open(_local_copy(f"{out}/results.json", str(copies))))["task"] == "tiny"
