"""The inference side: Ray Data evaluation matches the local one; local paths on a multi-node
cluster stop before any work (a fake node list, no real cluster)."""

import os

import pytest

from ktray.config import load_config
from ktray.errors import KtrayError
from ktray.stages import nodes


def _nodes(alive: int, dead: int = 0):
    return lambda: [{"NodeID": f"n{i}", "Alive": i < alive} for i in range(alive + dead)]


@pytest.mark.parametrize(
    "overrides, error",
    [
        (["out=/tmp/run"], "out=/tmp/run is a local path but the Ray cluster has 2 nodes"),
        (["out=s3://b/run", "ray.storage_path=/mnt/ray"], "ray.storage_path=/mnt/ray is a local"),
        (["out=s3://b/run"], None),
        (["out=/tmp/run", "ray.shared_storage=true"], None),
    ],
)
def test_local_paths_on_a_multinode_cluster(overrides, error, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", _nodes(2, dead=1))
    cfg = load_config("tiny", overrides)
    if error is None:
        nodes.check_shared_storage(cfg.ray, cfg.out)
        return
    with pytest.raises(KtrayError, match=error):
        nodes.check_shared_storage(cfg.ray, cfg.out)
    monkeypatch.setattr(ray, "nodes", _nodes(1, dead=2))  # one node alive: a local path is fine
    nodes.check_shared_storage(cfg.ray, cfg.out)


def test_multinode_check_stops_stages_before_work(tiny_task, tmp_path, monkeypatch, ray_local):
    import ray

    from ktray.stages import common, sweep

    monkeypatch.setattr(ray, "nodes", _nodes(3))
    out = str(tmp_path / "out")
    cfg = load_config("tiny", [f"data.root={tiny_task}", f"out={out}"])
    with pytest.raises(KtrayError, match="the Ray cluster has 3 nodes"):
        common.storage_path(cfg)  # what every Ray Train run asks first
    assert not os.path.exists(os.path.join(out, "ray"))
    cfg = load_config("sweeps/tiny", [f"data.root={tiny_task}", f"out={out}"])
    with pytest.raises(KtrayError, match="ray.shared_storage=true"):
        sweep.run(cfg)
    assert not os.path.exists(os.path.join(out, "sweep"))


def test_ray_data_evaluation_matches_the_local_one(tiny_task, tmp_path, ray_local):
    from ktray.models import TaskModel, create_backbone, save_model
    from ktray.pipeline.tasks import prepare_task
    from ktray.stages import evaluate as evaluate_stage

    cfg = load_config(
        "tiny", [f"data.root={tiny_task}", f"out={tmp_path / 'out'}", "eval_batch_size=5"]
    )
    info = prepare_task(cfg)
    backbone = create_backbone("test_resnet", pretrained=False, img_size=32)
    model_dir = str(tmp_path / "model")
    save_model(
        TaskModel(backbone, 3),
        model_dir,
        {
            "kind": "teacher",
            "arch": "test_resnet",
            "backbone": "test_resnet",
            "num_classes": 3,
            "img_size": 32,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    )  # unequal: a normalisation slip shows
    test_uri = info["outputs"]["test"]
    local = evaluate_stage.evaluate(cfg, model_dir, test_uri, 3, distributed=False)
    dist = evaluate_stage.evaluate(cfg, model_dir, test_uri, 3, distributed=True)
    assert dist["n"] == local["n"] == 12
    assert dist["confusion"] == local["confusion"]
    assert dist["test_accuracy"] == local["test_accuracy"]
    assert dist["loss"] == pytest.approx(local["loss"], rel=1e-4)
    with pytest.raises(KtrayError, match="predicts 3 classes but the task has 4"):
        evaluate_stage.evaluate(cfg, model_dir, test_uri, 4, distributed=True)


@pytest.mark.parametrize("eval_rows, path", [(10, "ray"), (12, "local"), (0, "ray")])
def test_evaluation_threshold_picks_the_path(eval_rows, path, tiny_task, tmp_path, monkeypatch):
    from ktray.pipeline.tasks import prepare_task
    from ktray.stages import evaluate as evaluate_stage

    cfg = load_config(
        "tiny",
        [f"data.root={tiny_task}", f"out={tmp_path / 'out'}", f"infer.eval_rows={eval_rows}"],
    )
    test_uri = prepare_task(cfg)["outputs"]["test"]  # 12 rows
    monkeypatch.setattr(evaluate_stage, "evaluate_distributed", lambda *a: "ray")
    monkeypatch.setattr(evaluate_stage, "evaluate_model_dir", lambda *a, **k: "local")
    assert evaluate_stage.evaluate(cfg, "model", test_uri, 3) == path


def test_transfer_size_trial_slices_the_largest_logits_set(tiny_task, tmp_path, ray_local):
    import numpy as np

    from ktray import storage
    from ktray.stages import logits as logits_stage

    args = [f"data.root={tiny_task}", "tracking.mlflow=false", "logits.views=2"]
    big = load_config("tiny", [*args, f"out={tmp_path / 'big'}"])
    source = logits_stage.run(big, "in_domain", shard_rows=5)["outputs"]["parts"]  # 10 parts
    adopt = [
        *args,
        f"teacher.checkpoint={tmp_path / 'big' / 'teacher' / 'model'}",
        "data.unlabeled_limit=10",
    ]
    small = load_config("tiny", [*adopt, f"out={tmp_path / 'small'}"])
    # streamed part by part into shards of 7 rows: shards straddle the source's parts
    m = logits_stage.slice_from(small, "in_domain", source, shard_rows=7)
    assert m["computed_shards"] == 0 and m["flops"] == 0 and m["rows"] == 20
    assert m["sliced_from"] == source and m["shards"] == 3
    parts = storage.parquet_parts(logits_stage.logits_dir(small, "in_domain"))
    assert [storage.read_parquet(p).num_rows for p in parts] == [7, 7, 6]
    assert logits_stage.run(small, "in_domain")["finished_at"] == m["finished_at"]  # reused
    # what a pass over the 10 images computes: the same rows, the same logits
    direct = load_config("tiny", [*adopt, f"out={tmp_path / 'direct'}"])
    logits_stage.run(direct, "in_domain")

    def rows(cfg):
        t = storage.read_parquet(logits_stage.logits_dir(cfg, "in_domain"))
        keys = list(
            zip(
                t["image_id"].to_pylist(),
                t["view"].to_pylist(),
                t["x0"].to_pylist(),
                t["flip"].to_pylist(),
            )
        )
        order = sorted(range(len(keys)), key=keys.__getitem__)
        return [keys[i] for i in order], np.asarray(t["logits"].to_pylist(), np.float32)[order]

    (k1, l1), (k2, l2) = rows(small), rows(direct)
    assert k1 == k2 and len(k1) == 20
    np.testing.assert_allclose(l1, l2, atol=2e-2)
    # a set that is not a subset of the source: no slice, the caller computes
    other = load_config("tiny", [*adopt, f"out={tmp_path / 'other'}"])
    few = load_config("tiny", [*adopt, f"out={tmp_path / 'few'}", "data.unlabeled_limit=5"])
    few_source = logits_stage.run(few, "in_domain")["outputs"]["parts"]
    assert logits_stage.slice_from(other, "in_domain", few_source) is None


def test_sweep_shares_stage_outputs_on_an_object_store(tmp_path):
    """On an object store a trial gets copies of the shared manifests (whose outputs point
    into the shared folder) and of the small tables it reads by path; no part file."""
    import fsspec

    from ktray import storage
    from ktray.stages.sweep_shared import link

    shared = "memory://ktray-test/sweep/shared/curate"
    trial = "memory://ktray-test/sweep/trial_x/curate"
    for name, data in (
        ("manifest.json", b'{"outputs": {"transfer_set": "x"}}'),
        ("transfer_set.parquet", b"PAR1"),
        ("config.yaml", b"out: x"),
        ("embeddings/gallery/part-00000.parquet", b"PAR1 big"),
    ):
        storage.write_bytes(f"{shared}/{name}", data)
    link(shared, trial)
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find("/ktray-test/sweep/trial_x")) == [
        "config.yaml",
        "manifest.json",
        "transfer_set.parquet",
    ]
    assert storage.read_bytes(f"{trial}/manifest.json") == b'{"outputs": {"transfer_set": "x"}}'
    # a local trial folder gets a symlink
    (tmp_path / "shared").mkdir()
    link(str(tmp_path / "shared"), str(tmp_path / "trial" / "curate"))
    assert os.path.islink(tmp_path / "trial" / "curate")


@pytest.mark.parametrize(
    "overrides, gpus_per_actor, cluster_gpus, size",
    [
        ([], 1.0, 4, 4),  # default: one actor per GPU of the cluster
        ([], 0.5, 4, 8),
        ([], 0.0, 0, 1),  # a CPU cluster: one actor (the pool autoscales from 1)
        (["infer.actors=3"], 1.0, 8, 3),
    ],
)
def test_actor_pool_size(overrides, gpus_per_actor, cluster_gpus, size):
    from ktray.stages.shards import pool_size

    assert pool_size(load_config(None, overrides), gpus_per_actor, cluster_gpus) == size
