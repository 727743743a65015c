"""The tiny pipeline with its data, outputs and Ray Train storage on a real S3 server."""

import json
import os
import time

from ktray import cli, io


def test_tiny_pipeline_on_s3(s3_server, tmp_path, monkeypatch, ray_local, capsys):
    from imagegen import make_imagefolder

    local_task = make_imagefolder(str(tmp_path / "task"))
    fs = s3_server.fs
    fs.put(local_task + "/", f"{s3_server.bucket}/task/", recursive=True)
    data, out, storage = s3_server.url("task"), s3_server.url("out"), s3_server.url("ray")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    start = time.perf_counter()
    code = cli.main(["run", "tiny", f"data.root={data}", f"out={out}",
                     f"ray.storage_path={storage}"])
    seconds = time.perf_counter() - start
    print(f"s3 pipeline: {seconds:.1f}s")
    assert code == 0, capsys.readouterr().err[-3000:]
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
    parts = fs.glob(f"{s3_server.bucket}/out/logits/in_domain/part-*.parquet")
    assert parts
    table = io.read_parquet(s3_server.url("out", "logits", "in_domain"))
    assert table.num_rows == 48 and len(set(zip(table["image_id"].to_pylist(),
                                                table["view"].to_pylist()))) == 48
    assert not fs.glob(f"{s3_server.bucket}/out/**/.*tmp*")
    # nothing written locally: not in the working directory, not beside the task
    assert os.listdir(work) == []
    assert sorted(os.listdir(tmp_path)) == ["cwd", "task"]
