"""``ktray predict`` of a segmentation model: a PNG mask per readable image at the image's own
size, the logits resized bilinearly then the argmax (what ktray evaluates), from a checkpoint
and from its ONNX export; the shared logits -> mask function against torch."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ktray import dense_export, export, storage
from ktray.data.views import eval_transform
from ktray.models import save_model
from ktray.models.dense import DenseStudent
from ktray.seg_masks import logits_to_mask

C = 3
NAMES = ["bg", "a", "b"]
SIZES = {"wide.png": (40, 24), "tall.png": (17, 50)}  # (width, height)


def _student(path):
    torch.manual_seed(0)
    model = DenseStudent("test_resnet", C, "fpn").eval()
    with torch.no_grad():  # untrained, but a head whose masks have class boundaries
        model.classifier.bias.zero_()
        model.classifier.weight.normal_(0, 1.0)
    spec = {
        "kind": "seg_student",
        "arch": "test_resnet",
        "head": "fpn",
        "num_classes": C,
        "class_names": NAMES,
        "img_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_model(model, str(path), spec)
    return model, spec


def _images(root):
    """Two readable images of different sizes in a sub folder, and a corrupt file."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "sub")
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(root / "sub" / name)
    (root / "broken.png").write_bytes(b"not an image")
    return str(root)


def _reference(fn, root, spec):
    """``{file name: mask}`` computed directly: the image at S x S, ``fn`` its logits, resized
    to the image's size with torch (bilinear, align_corners=False), argmax."""
    out = {}
    for name, (w, h) in SIZES.items():
        img = Image.open(os.path.join(root, "sub", name)).convert("RGB")
        x = eval_transform(img, spec["img_size"], spec["mean"], spec["std"])[None]
        with torch.no_grad():
            z = fn(x)
        up = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        out[name] = up.argmax(1)[0].numpy().astype(np.uint8)
    return out


def _predicted(out_dir):
    t = storage.read_parquet(os.path.join(out_dir, "predictions"))
    assert t.column_names == ["image_id", "source", "mask", "width", "height", "classes"]
    got = {}
    for row in t.to_pylist():
        mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
        assert mask.dtype == np.uint8 and mask.shape == (row["height"], row["width"])
        assert row["classes"] == np.unique(mask).tolist()
        got[os.path.basename(row["source"])] = mask
    return got, json.load(open(os.path.join(out_dir, "predictions", "manifest.json")))


def _check(got, ref, m):
    assert set(got) == set(ref)
    assert all(len(np.unique(r)) > 1 for r in ref.values())  # masks with boundaries to get right
    for name, mask in got.items():
        assert mask.shape == ref[name].shape, name
        assert np.array_equal(mask, ref[name]), (name, (mask != ref[name]).mean())
    assert (m["images"], m["rows"], m["skipped"]) == (3, 2, 1)
    assert m["task_type"] == "segmentation" and m["class_names"] == NAMES


@pytest.mark.ray
def test_predict_writes_masks_of_a_checkpoint_at_each_image_size(tmp_path, ray_local, capsys):
    from ktray import cli

    model, spec = _student(tmp_path / "m")
    root = _images(tmp_path / "img")
    out = str(tmp_path / "p")
    code = cli.main(["predict", str(tmp_path / "m"), "--input", root, f"out={out}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    got, m = _predicted(out)
    _check(got, _reference(model, root, spec), m)


@pytest.mark.ray
def test_predict_writes_the_same_masks_from_the_onnx_export(tmp_path, ray_local):
    from ktray.config import load_config
    from ktray.stages import predict

    model, spec = _student(tmp_path / "m")
    ex = export.export_model(str(tmp_path / "m"), str(tmp_path / "x"), check_images=2)
    root = _images(tmp_path / "img")
    cfg = load_config(None, [f"out={tmp_path}/p", "ray.num_cpus=2"])
    predict.run(cfg, os.path.dirname(ex["files"]["onnx"]), root, shard_rows=2)
    got, m = _predicted(str(tmp_path / "p"))
    # the exported graph: the logits upsampled to S x S, then resized to the image
    _check(got, _reference(dense_export.exportable(model, spec), root, spec), m)
    assert m["shards"] == 2


@pytest.mark.parametrize(
    "shape, size", [((4, 4), (24, 40)), ((32, 32), (50, 17)), ((7, 5), (3, 2))]
)
def test_logits_to_mask_is_torch_bilinear_then_argmax(shape, size):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((C, *shape)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(z)[None], size=size, mode="bilinear", align_corners=False)
    assert np.array_equal(logits_to_mask(z, size), ref.argmax(1)[0].numpy())
