"""Deployable students: ONNX export and its parity check, int8, speed, the MLflow pyfunc model,
``ktray export`` and ``ktray predict``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ktray import cli, export
from ktray.errors import KtrayError
from ktray.models import create_student, load_model, save_model


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("student") / "model")
    save_model(create_student("resnet10t", 3, img_size=32), d)
    return d


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A student with known predictions: trained until it names the colour of a colour image
    (``imagegen.colour_image``: class = colour)."""
    from imagegen import colour_image

    from ktray.data.views import eval_transform

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_student("test_resnet", 3, img_size=32)
    images = [colour_image(i % 3, rng, 24) for i in range(48)]
    x = torch.stack([eval_transform(im, 32, model.mean, model.std) for im in images])
    y = torch.arange(48) % 3
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(30):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    d = str(tmp_path_factory.mktemp("trained") / "model")
    save_model(model, d)
    return d


def _images(root: str, n: int = 12, size: int = 24) -> tuple[list[str], list[int]]:
    """Colour images ``img{i}.png`` (some grayscale-free PNGs, some JPEGs) and their colours."""
    from imagegen import colour_image

    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(root, f"img{i:02d}." + ("jpg" if i % 4 == 3 else "png"))
        colour_image(i % 3, rng, size).save(p)
        paths.append(p)
    return paths, [i % 3 for i in range(n)]


def _reference(model_dir: str, paths: list[str]) -> np.ndarray:
    """Classes of the images by plain PyTorch with ktray's own preprocessing."""
    from PIL import Image

    from ktray.data.views import eval_transform

    model, spec = load_model(model_dir)
    x = torch.stack(
        [eval_transform(Image.open(p), spec["img_size"], spec["mean"], spec["std"]) for p in paths]
    )
    with torch.no_grad():
        return model(x).argmax(1).numpy()


@pytest.mark.slow
def test_export_matches_pytorch_and_int8_is_smaller(student_dir, tmp_path):
    r = export.export_model(
        student_dir,
        str(tmp_path / "e"),
        int8=True,
        exporter="dynamo",
        check_images=16,
        speed_iters=1,
    )
    assert r["parity"]["onnx"]["max_abs_diff"] < 1e-4
    assert r["parity"]["onnx"]["top1_agreement"] == 1.0 and r["parity"]["onnx"]["n"] == 16
    # int8: a quarter of the bytes, nearly the same decisions (reported, not enforced)
    assert r["file_mb"]["int8"] < 0.35 * r["file_mb"]["onnx"]
    assert r["parity"]["int8"]["top1_agreement"] >= 0.8
    assert r["parity"]["int8"]["max_abs_diff"] > r["parity"]["onnx"]["max_abs_diff"]
    model, _ = load_model(student_dir)
    assert r["params"] == sum(p.numel() for p in model.parameters())
    assert 0.01 < r["gflops"] < 0.1 and abs(r["mb"] - r["file_mb"]["onnx"]) < 0.5
    assert set(r["speed"]) >= {"pytorch", "onnx", "int8"}
    assert all(
        r["speed"][k]["latency_ms"] > 0 and r["speed"][k]["throughput"] > 0
        for k in ("pytorch", "onnx", "int8")
    )
    # the batch axis is dynamic: batch 1 and 5 run and agree with PyTorch
    s = export.onnx_session(r["files"]["onnx"])
    for n in (1, 5):
        x = export.fixed_inputs(n, 32, seed=7)
        ref = export.torch_logits(model, x)
        assert np.abs(export.onnx_logits(s, x) - ref).max() < 1e-4
    spec = json.load(open(tmp_path / "e" / export.SPEC_FILE))
    assert spec["img_size"] == 32 and spec["onnx_input"] == export.INPUT_NAME


def test_export_that_differs_from_pytorch_fails(student_dir, tmp_path, monkeypatch):
    """An exported graph that does not compute what the checkpoint computes (here: a weight
    perturbed after the model was prepared) is an error, not a silent bad file."""
    prepare = export.prepare

    def perturbed(model):
        m, fused = prepare(model)
        with torch.no_grad():
            m.get_classifier().weight.add_(0.05)
        return m, fused

    monkeypatch.setattr(export, "prepare", perturbed)
    with pytest.raises(KtrayError, match="differs from PyTorch: max abs logit difference"):
        export.export_model(student_dir, str(tmp_path / "bad"), exporter="torchscript")
    assert not os.path.exists(tmp_path / "bad" / export.SPEC_FILE)


@pytest.mark.slow
def test_reparameterized_model_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    d = str(tmp_path / "m")
    save_model(create_student("mobileone_s0", 4, img_size=32), d)
    r = export.export_model(d, str(tmp_path / "e"), exporter="torchscript", check_images=8)
    assert r["reparameterized"] is True
    # random-init MobileOne's logits reach ~1e13: the tolerance scales with them
    p = r["parity"]["onnx"]
    assert p["max_abs_diff"] <= p["tolerance"] < 1e-3 * 1e14 and p["top1_agreement"] == 1.0
    fused = export.prepare(load_model(d)[0])[0]
    assert not any(hasattr(m, "rbr_skip") and m.rbr_skip is not None for m in fused.modules())


def test_quantize_rejects_unknown_mode_and_missing_calibration(tmp_path):
    with pytest.raises(KtrayError, match="unknown int8 mode"):
        export.quantize_int8("a.onnx", str(tmp_path / "b.onnx"), mode="int4")
    with pytest.raises(KtrayError, match="calibration"):
        export.quantize_int8("a.onnx", str(tmp_path / "b.onnx"), mode="static")


@pytest.mark.slow
def test_pyfunc_model_predicts_what_pytorch_predicts(trained_dir, tmp_path):
    import mlflow
    import pandas as pd

    from ktray.config import load_config
    from ktray.pipeline import tracking

    paths, colours = _images(str(tmp_path / "img"))
    cfg = load_config(
        None,
        [f"out={tmp_path}/out", "export.exporter=torchscript", "tracking.experiment=export-test"],
    )
    os.makedirs(cfg.out)
    mlflow_ = tracking._mlflow(cfg)
    with mlflow_.start_run() as run:
        backend = tracking.log_student_model(mlflow_, cfg, trained_dir, str(tmp_path))
    assert backend == "onnx"
    # the artifacts live under OUT, beside the sqlite store
    assert run.info.artifact_uri.startswith((tmp_path / "out" / "mlartifacts").as_uri())
    version = mlflow.register_model(f"runs:/{run.info.run_id}/student", "export-test-model")
    loaded = mlflow.pyfunc.load_model(f"models:/export-test-model/{version.version}")
    images = pd.DataFrame({"image": [open(p, "rb").read() for p in paths]})
    out = loaded.predict(images)
    ref = _reference(trained_dir, paths)
    np.testing.assert_array_equal(ref, colours)  # PyTorch names every colour
    np.testing.assert_array_equal(out["pred"].to_numpy(), ref)
    assert ((out["prob"] > 0) & (out["prob"] <= 1)).all()
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/student")
    assert {"MLmodel", "model.safetensors", "model.json"} <= set(os.listdir(local))


def test_cli_export_with_task_reports_int8_accuracy(student_dir, tiny_task, tmp_path, capsys):
    out = tmp_path / "exp"
    code = cli.main(
        [
            "export",
            student_dir,
            f"out={out}",
            "export.int8=true",
            "export.exporter=torchscript",
            "export.speed_iters=1",
            "--config",
            "tiny",
            f"data.root={tiny_task}",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    m = json.load(open(out / "manifest.json"))
    acc = m["test_accuracy"]
    assert acc["images"] == 12 and set(acc) == {"pytorch", "onnx", "int8", "images"}
    assert acc["onnx"] == acc["pytorch"]  # fp32 ONNX decides as PyTorch does
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size / 3
    assert "int8 (static)" in captured.out and "test accuracy" in captured.out
    assert cli.main(["export", str(tmp_path / "nothing"), f"out={out}"]) == 2
    assert "no model checkpoint" in capsys.readouterr().err


@pytest.mark.ray
def test_predict_writes_one_row_per_readable_image(trained_dir, tmp_path, ray_local):
    from ktray import storage
    from ktray.config import load_config
    from ktray.stages import predict, shards

    paths, colours = _images(str(tmp_path / "img" / "sub"), n=10)
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    ref = dict(zip((os.path.basename(p) for p in paths), colours))
    ex = export.export_model(trained_dir, str(tmp_path / "onnx"), exporter="torchscript")
    for i, model_dir in enumerate((trained_dir, os.path.dirname(ex["files"]["onnx"]))):
        cfg = load_config(None, [f"out={tmp_path}/p{i}", "ray.num_cpus=2"])
        m = predict.run(cfg, model_dir, str(tmp_path / "img"), shard_rows=4)
        assert (m["images"], m["rows"], m["skipped"], m["shards"]) == (11, 10, 1, 3)
        t = storage.read_parquet(predict.predictions_dir(cfg))
        assert sorted(t.column_names) == sorted(["image_id", "source", "pred", "prob", "probs"])
        got = {
            os.path.basename(s): p for s, p in zip(t["source"].to_pylist(), t["pred"].to_pylist())
        }
        assert got == {k: int(v) for k, v in ref.items()}
        probs = np.asarray(t["probs"].to_pylist())
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # resumable: a lost part is recomputed alone, the rest reused
    os.remove(os.path.join(predict.predictions_dir(cfg), "manifest.json"))
    os.remove(os.path.join(predict.predictions_dir(cfg), shards.part_name(1)))
    m = predict.run(cfg, model_dir, str(tmp_path / "img"), shard_rows=4)
    assert m["computed_shards"] == 1 and m["rows"] == 10
    assert predict.run(cfg, model_dir, str(tmp_path / "img"), shard_rows=4) == m  # reused
    # the model rewritten under the same path (here: its file touched): all predicted afresh,
    # the parts of a killed run of the old model included
    os.remove(os.path.join(predict.predictions_dir(cfg), "manifest.json"))
    os.utime(ex["files"]["onnx"], (1, 1))
    m = predict.run(cfg, model_dir, str(tmp_path / "img"), shard_rows=4)
    assert m["computed_shards"] == 3 and m["rows"] == 10


def test_the_predict_actor_predicts_decoded_pixels_and_reads_no_image(trained_dir, tmp_path):
    """``ktray predict`` decodes in CPU tasks (``decode_tasks.full_images``) and the model
    actor only predicts: it gets a shard's pixels, and the image files may be gone by then (an
    actor that decoded them itself would keep a GPU waiting for its CPU)."""
    import pyarrow as pa

    from ktray.stages import decode_tasks, predict, shards

    paths, colours = _images(str(tmp_path / "img"), n=6)
    rows = pa.table({"image_id": [f"i{k}" for k in range(7)], "source": [*paths, "/no/such.png"]})
    part = decode_tasks.full_images(shards.shard_block(rows, "p", 0, 7), 32)
    for p in paths:
        os.remove(p)
    writer = predict.PredictWriter({"p": str(tmp_path / "out")}, trained_dir, batch_size=4)
    table, skipped = writer.process(part)
    assert skipped == 1 and table["image_id"].to_pylist() == [f"i{k}" for k in range(6)]
    assert table["pred"].to_pylist() == [int(c) for c in colours]


def test_speed_table_measures_each_architecture_once(student_dir, tmp_path):
    from ktray.config import load_config
    from ktray.models import TaskModel, create_backbone
    from ktray.pipeline.reporting import format_table, markdown
    from ktray.stages.run import speed_table

    teacher = str(tmp_path / "teacher")
    save_model(TaskModel(create_backbone("test_vit", pretrained=False, img_size=32), 3), teacher)
    cfg = load_config("tiny", [f"out={tmp_path}/out"])
    rows = speed_table(cfg, {"teacher": teacher, "scratch": student_dir, "task@x": student_dir})
    assert rows["scratch"]["measured_with"] == rows["task@x"]["measured_with"] == "scratch"
    assert rows["teacher"]["arch"] == "test_vit" and rows["scratch"]["arch"] == "resnet10t"
    assert "speedup" not in rows["teacher"]
    t, s = rows["teacher"]["speed"]["onnx"], rows["scratch"]["speed"]["onnx"]
    assert rows["scratch"]["speedup"]["onnx"]["latency"] == pytest.approx(
        t["latency_ms"] / s["latency_ms"]
    )
    assert os.path.exists(tmp_path / "out" / "export" / "scratch" / export.INT8_FILE)
    assert not os.path.exists(tmp_path / "out" / "export" / "task@x")
    results = {
        "task": "t",
        "labels_per_class": 1,
        "speed": rows,
        "methods": {"teacher": {"test_accuracy": 0.5}},
    }
    text = format_table(results)
    assert "ORT int8 ms" in text and "resnet10t @32" in text
    assert "## Speed" in markdown(results)
