"""Deployable dense students: ONNX export as logits [N, C, S, S] with a parity check, test mIoU
of PyTorch and ONNX side by side, the MLflow segmenter pyfunc, the segmentation speed table."""

import io
import json
import os

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_segmentation import make_segfolder

from ktray import dense_export, export
from ktray.data import segmentation as seg
from ktray.models import save_model
from ktray.models.dense import DenseStudent

C = 3


def _student(path, head="fpn", img_size=32):
    torch.manual_seed(0)
    model = DenseStudent("test_resnet", C, head).eval()
    spec = {
        "kind": "seg_student",
        "arch": "test_resnet",
        "head": head,
        "num_classes": C,
        "img_size": img_size,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_model(model, str(path), spec)
    return model, spec


@pytest.mark.parametrize("head", ["fpn", "deeplabv3"])
def test_dense_export_is_full_resolution_logits_equal_to_pytorch(tmp_path, head):
    model, _ = _student(tmp_path / "m", head)
    r = export.export_model(str(tmp_path / "m"), str(tmp_path / "x"), int8=True, check_images=4)
    assert r["output_shape"] == ["batch", C, 32, 32]
    assert r["parity"]["onnx"]["top1_agreement"] == 1.0
    assert 0.0 <= r["parity"]["int8"]["top1_agreement"] <= 1.0
    assert os.path.exists(r["files"]["int8"])
    spec = json.load(open(tmp_path / "x" / "model.json"))
    assert spec["onnx_output_axes"] == ["N", "C", "S", "S"]
    # The graph itself: the student's stride-8 logits upsampled to the input (bilinear,
    # half-pixel), for a batch size the check did not use.
    x = export.fixed_inputs(5, 32, seed=7)
    got = ort.InferenceSession(r["files"]["onnx"]).run(None, {"input": x})[0]
    with torch.no_grad():
        small = model(torch.from_numpy(x))
        ref = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    assert small.shape == (5, C, 4, 4) and got.shape == (5, C, 32, 32)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4 * max(1, float(ref.abs().max())))


def test_int8_failure_is_one_line_naming_the_model(tmp_path, monkeypatch):
    from ktray.errors import KtrayError

    _student(tmp_path / "m")

    def broken(*args, **kwargs):
        raise RuntimeError("no QLinearResize kernel\ntraceback noise")

    monkeypatch.setattr(export, "quantize_int8", broken)
    with pytest.raises(KtrayError) as e:
        export.export_model(str(tmp_path / "m"), str(tmp_path / "x"), int8=True, check_images=2)
    msg = str(e.value)
    assert "\n" not in msg and "noise" not in msg
    assert "int8 (static) quantisation of" in msg and "RuntimeError: no QLinearResize" in msg
    assert "model.onnx is fine (export.int8=false" in msg


def test_old_deeplab_checkpoints_load_after_the_fuse_rename():
    torch.manual_seed(0)
    a, b = DenseStudent("test_resnet", C, "deeplabv3"), DenseStudent("test_resnet", C, "deeplabv3")
    old = {k.replace("decoder.merge.", "decoder.fuse."): v for k, v in a.state_dict().items()}
    assert any(k.startswith("decoder.fuse.") for k in old)
    b.load_state_dict(old, strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_miou_by_backend_matches_the_evaluation_at_mask_size(tmp_path):
    from ktray.seg_evaluation import evaluate_seg_model_dir
    from ktray.storage import write_parquet

    _student(tmp_path / "m", img_size=16)  # predicts 16 x 16 for 32 x 32 masks
    table = seg.read_segfolder_split(make_segfolder(tmp_path / "d", n_test=4), "test")
    write_parquet(str(tmp_path / "test.parquet"), table)
    r = export.export_model(str(tmp_path / "m"), str(tmp_path / "x"), check_images=2)
    model, spec = export.load_model(str(tmp_path / "m"))
    model = dense_export.exportable(model, spec)
    got = dense_export.miou_by_backend(model, r["files"], table, spec)
    ref = evaluate_seg_model_dir(str(tmp_path / "m"), str(tmp_path / "test.parquet"), 8, C)
    assert got["images"] == 4
    assert got["pytorch"] == pytest.approx(ref["test_miou"], abs=1e-9)
    assert got["onnx"] == pytest.approx(got["pytorch"], abs=1e-3)


def test_segmenter_pyfunc_returns_masks_at_the_image_size(tmp_path):
    from ktray.serving import ImageSegmenterModel, model_class

    model, spec = _student(tmp_path / "m")
    r = export.export_model(str(tmp_path / "m"), str(tmp_path / "x"), check_images=2)
    artifacts = {"spec": str(tmp_path / "x" / "model.json"), "onnx": r["files"]["onnx"]}
    assert model_class(spec) is ImageSegmenterModel
    pyfunc = ImageSegmenterModel()
    pyfunc.load_context(type("Ctx", (), {"artifacts": artifacts})())
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (24, 40, 3)).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = pyfunc.predict(None, pd.DataFrame({"image": [buf.getvalue()] * 2}))
    mask = np.asarray(Image.open(io.BytesIO(out["mask"][0])))
    assert mask.shape == (24, 40) and mask.dtype == np.uint8
    # what ktray evaluates: the image at S x S, logits resized to the image, argmax
    from ktray.data.views import eval_transform

    x = eval_transform(img, 32, spec["mean"], spec["std"])[None]
    with torch.no_grad():
        ref = F.interpolate(model(x), size=(24, 40), mode="bilinear", align_corners=False)
    agree = (ref.argmax(1)[0].numpy() == mask).mean()
    assert agree > 0.97, agree
    assert out["classes"][0] == ",".join(str(v) for v in np.unique(mask))


def test_segmentation_report_shows_the_speed_table():
    from ktray.pipeline import seg_report

    row = {"arch": "a", "img_size": 32, "params": 1e6, "gflops": 0.1, "mb": 4.0}
    speed = {"pytorch": {"latency_ms": 2.0, "throughput": 100.0}, "batch_size": 32}
    results = {
        "task": "t",
        "num_classes": C,
        "methods": {"teacher": {"test_miou": 0.5}, "scratch": {"test_miou": 0.4}},
        "speed": {
            "teacher": dict(row, speed=speed),
            "scratch": dict(
                row, speed=speed, speedup={"onnx": {"throughput": 3.0, "latency": 2.0}}
            ),
        },
    }
    text = seg_report.format_table(results)
    assert "CPU speed" in text and "a @32" in text
    md = seg_report.markdown(results)
    assert "## Speed on this machine's CPU" in md
    assert [line for line in md.splitlines() if line.startswith("| scratch | a @32")]


@pytest.mark.slow
def test_tiny_segparquet_run_speed_table_mlflow_segmenter_and_report(tmp_path, ray_local):
    """Parquet masks in, a speed table of dense exports, the best student logged to MLflow as
    a segmenter (registered with its test mIoU), and `ktray report` on test mIoU."""
    import mlflow
    from test_seg_parquet import folder_to_parquet

    from ktray import cli

    folder = make_segfolder(tmp_path / "d", n_train=6, n_test=4, n_unl=0)
    root = str(tmp_path / "pq")
    for split in ("train", "test"):
        folder_to_parquet(folder, root, split, mask_column="annotation")
    out, uri = str(tmp_path / "out"), f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "run",
        "segfolder",
        "data.kind=segparquet",
        f"data.root={root}",
        "data.mask_column=annotation",
        "data.class_names=[a,b,c]",
        f"out={out}",
        "methods=[teacher,scratch]",
        "teacher.backbone=test_vit",
        "teacher.pretrained=false",
        "teacher.img_size=32",
        "teacher.epochs=2",
        "teacher.probe_views=2",
        "student.arch=test_resnet",
        "student.img_size=32",
        "finetune.steps=2",
        "finetune.scratch_steps=2",
        "finetune.batch_size=4",
        "finetune.warmup_steps=1",
        "export.speed=true",
        "export.speed_iters=1",
        "export.check_images=2",
        "tracking.mlflow=true",
        f"tracking.tracking_uri={uri}",
    ]
    assert cli.main(args) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["task_type"] == "segmentation" and results["train_images"] == 6
    scratch = results["speed"]["scratch"]
    assert {"pytorch", "onnx", "int8"} <= set(scratch["speed"]) and "teacher" in results["speed"]
    spec = json.load(open(os.path.join(out, "export", "scratch", "model.json")))
    assert spec["onnx_output_axes"] == ["N", "C", "S", "S"]
    assert "## Speed on this machine's CPU" in open(os.path.join(out, "results.md")).read()
    # MLflow: the best student by test mIoU, logged as a segmenter pyfunc, registered
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ktray").experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    miou = results["methods"]["scratch"]["test_miou"]
    assert run.data.metrics["best_student_test_miou"] == pytest.approx(miou)
    version = client.get_model_version("ktray-student", run.data.tags["registered_version"])
    assert version.tags["test_miou"] == f"{miou:.4f}"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/student")
    png = open(os.path.join(folder, "images", "test", "im0.png"), "rb").read()
    pred = model.predict(pd.DataFrame({"image": [png]}))
    assert np.asarray(Image.open(io.BytesIO(pred["mask"][0]))).shape == (32, 32)
    # ktray report: the compute table and plot on test mIoU
    assert cli.main(["report", out]) == 0
    md = open(os.path.join(out, "report", "compute.md")).read()
    assert "test mIoU against pretraining compute" in md
