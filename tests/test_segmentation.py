"""Semantic segmentation: mIoU with ignored pixels, dense KD, mask checks, dense models, the
mosaic task, and a tiny end-to-end `ktray run` of a segfolder task."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ktray import cli, storage
from ktray.data import segmentation as seg
from ktray.dense_distill import dense_feature_loss, dense_kd_loss
from ktray.errors import KtrayError
from ktray.models.backbones import create_backbone
from ktray.models.dense import DenseStudent, DenseTeacher
from ktray.seg_metrics import seg_confusion, seg_scores


def test_miou_against_hand_computed_example_with_ignored_pixels():
    # 3 classes; 255 = ignore. Ground truth / prediction, 2 x 4 pixels.
    gt = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 1]])
    pr = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    conf = seg_confusion(pr, gt, 3, 255)
    # counted pixels: 6 (two ignored; the 0 predicted there counts nowhere).
    # class 0: tp 1, gt 2, pred 2 -> union 3 -> 1/3; class 1: tp 2, gt 3, pred 3 -> union 4
    # -> 1/2; class 2: tp 1, gt 1, pred 1 -> 1.0
    s = seg_scores(conf)
    assert conf.sum() == 6
    assert s["per_class_iou"] == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1.0) / 3)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)


def test_miou_leaves_out_absent_classes_and_rejects_unknown_ids():
    gt = torch.tensor([[0, 0], [1, 1]])
    s = seg_scores(seg_confusion(gt.clone(), gt, 4, 255))
    assert s["per_class_iou"][2:] == [None, None] and s["miou"] == 1.0
    with pytest.raises(KtrayError, match="mask class ids"):
        seg_confusion(gt, torch.tensor([[0, 7], [1, 1]]), 4, 255)


def test_dense_kd_matches_a_reference_computation():
    torch.manual_seed(0)
    s, t, T = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4, 4), 2.0
    s_small = F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    ref = 0.0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                p = torch.softmax(t[b, :, i, j] / T, 0)
                q = torch.log_softmax(s_small[b, :, i, j] / T, 0)
                ref += float((p * (p.log() - q)).sum())
    ref = ref / 32 * T * T
    assert float(dense_kd_loss(s, t, T)) == pytest.approx(ref, rel=1e-5)
    assert float(dense_kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KtrayError, match="class count"):
        dense_kd_loss(torch.randn(2, 4, 4, 4), t)
    a = torch.randn(2, 6, 3, 3)
    assert float(dense_feature_loss(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_segfolder(root, n_train=6, n_test=4, n_unl=8, size=32, classes=3):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            mask = np.zeros((size, size), np.uint8)
            c = 1 + k % (classes - 1)
            mask[4:20, 6 + k % 6 : 22] = c
            mask[0, 0] = 255
            img = np.stack([mask * 60 + rng.integers(0, 40, (size, size))] * 3, -1)
            _write(os.path.join(root, "images", split, f"im{k}.png"), img.astype(np.uint8))
            _write(os.path.join(root, "masks", split, f"im{k}.png"), mask)
    for k in range(n_unl):
        img = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
        _write(os.path.join(root, "unlabeled", f"u{k}.png"), img)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(f"c{i}" for i in range(classes)) + "\n")
    return str(root)


def test_bad_masks_stop_with_one_line_naming_the_file(tmp_path):
    root = make_segfolder(tmp_path / "d")
    train = seg.read_segfolder_split(root, "train")
    seg.check_masks(train, 3, 255)
    bad = os.path.join(root, "masks", "train", "im1.png")
    _write(bad, np.full((32, 32), 7, np.uint8))  # unknown class id
    with pytest.raises(KtrayError, match=r"im1\.png has class id 7"):
        seg.check_masks(train, 3, 255)
    _write(bad, np.zeros((16, 32), np.uint8))  # wrong size
    with pytest.raises(KtrayError, match=r"im1\.png is 32x16 but its image"):
        seg.check_masks(train, 3, 255)
    _write(bad, np.zeros((32, 32, 3), np.uint8))  # RGB
    with pytest.raises(KtrayError, match="single-channel"):
        seg.check_masks(train, 3, 255)
    os.remove(bad)
    with pytest.raises(KtrayError, match=r"images/train/im1\.png has no mask"):
        seg.read_segfolder_split(root, "train")


def test_joint_view_keeps_image_and_mask_aligned(tmp_path):
    root = make_segfolder(tmp_path / "d")
    ds = seg.SegImages(seg.read_segfolder_split(root, "train"), 32, (0, 0, 0), (1, 1, 1), True)
    for i in range(3):
        x, m = ds[i]
        assert x.shape == (3, 32, 32) and m.shape == (32, 32)
        fg = (m > 0) & (m < 255)
        # the image is bright where the mask has a class (60 * class + noise < 40)
        if fg.any():
            assert x[0][fg].mean() > x[0][m == 0].mean() + 0.1


def test_mosaic_labels_are_garment_classes_on_foreground():
    rng = np.random.default_rng(0)
    garments = np.zeros((2, 28, 28), np.uint8)
    garments[:, 8:20, 8:20] = 200
    rgb, mask = seg.make_mosaic(rng, garments, np.array([3, 3]), size=64)
    assert rgb.shape == (64, 64, 3) and mask.shape == (64, 64)
    assert set(np.unique(mask)) == {0, 4}  # background + class 3 (+1)
    assert rgb[mask == 4].mean() > rgb[mask == 0].mean() + 50


def test_dense_models_shapes():
    teacher = DenseTeacher(create_backbone("test_vit", pretrained=False, img_size=32), 4)
    logits, feats = teacher.forward_all(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4, 2, 2) and feats.shape[1] == teacher.feature_dim
    teacher.set_trainable("linear")
    assert not any(p.requires_grad for p in teacher.dense.parameters())
    for head in ("fpn", "deeplabv3"):
        student = DenseStudent("test_resnet", 4, head)
        out, f = student.forward_all(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 4, 8, 8) and f.shape == (2, 64, 8, 8)
    with pytest.raises(KtrayError, match="student.head"):
        DenseStudent("test_resnet", 4, "unet")


@pytest.mark.slow
def test_tiny_segmentation_pipeline_end_to_end(tmp_path, ray_local):
    root = make_segfolder(tmp_path / "d")
    out = str(tmp_path / "out")
    args = [
        "run",
        "segfolder",
        f"data.root={root}",
        f"out={out}",
        "methods=[teacher,scratch,features@in_domain,task@in_domain]",
        "teacher.backbone=test_vit",
        "teacher.pretrained=false",
        "teacher.img_size=32",
        "teacher.epochs=2",
        "teacher.probe_views=2",
        "student.arch=test_resnet",
        "student.img_size=32",
        "logits.dense_size=4",
        "logits.dense_feature_size=2",
        "logits.batch_size=8",
        "distill.steps=3",
        "distill.batch_size=4",
        "distill.warmup_steps=1",
        "finetune.steps=2",
        "finetune.scratch_steps=2",
        "finetune.batch_size=4",
        "finetune.warmup_steps=1",
        "tracking.mlflow=false",
    ]
    assert cli.main(args) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["task_type"] == "segmentation" and results["num_classes"] == 3
    for name, m in results["methods"].items():
        assert 0.0 <= m["test_miou"] <= 1.0 and "test_accuracy" not in m, name
        assert len(m["per_class_iou"]) == 3
    ft = json.load(open(os.path.join(out, "finetune", "task@in_domain", "manifest.json")))
    assert results["methods"]["task@in_domain"]["test_miou"] == ft["test_miou"]
    assert "distill_test_miou" in results["methods"]["task@in_domain"]
    # the saved student records what trained it, as a classifier does (seed included)
    model_json = os.path.join(out, "finetune", "task@in_domain", "model", "model.json")
    trained = json.load(open(model_json))["train"]
    assert (trained["kind"], trained["steps"], trained["seed"]) == ("finetune", 2, 0)
    # dense logits: C x s x s float16 per row, one row per unlabeled image
    table = storage.read_parquet(os.path.join(out, "logits", "in_domain"))
    assert len(table) == 8
    logits_type = table.schema.field("logits").type
    assert logits_type.list_size == 3 * 4 * 4 and str(logits_type.value_type) == "halffloat"
    assert table.schema.field("features").type.list_size % 4 == 0
    assert open(os.path.join(out, "masks.png"), "rb").read(4) == b"\x89PNG"
    assert "test mIoU" in open(os.path.join(out, "results.md")).read()


def test_online_dense_targets_equal_the_stored_ones():
    from ktray.dense_distill import DenseDistillModule
    from ktray.models.dense import dense_targets

    torch.manual_seed(0)
    teacher = DenseTeacher(create_backbone("test_vit", pretrained=False, img_size=32), 3).eval()
    student = DenseStudent("test_resnet", 3, "fpn")
    x, xt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = dense_targets(teacher, xt, 4, 2)
    assert logits.shape == (2, 3, 4, 4) and feats.shape == (2, teacher.feature_dim, 2, 2)
    for objective in ("task", "features"):
        m = DenseDistillModule(
            student,
            teacher,
            objective=objective,
            temperature=2.0,
            teacher_dim=teacher.feature_dim,
            dense_size=4,
            feature_size=2,
        ).eval()
        online = m(x, x_teacher=xt)["loss"]
        stored = m(x, teacher_logits=logits, teacher_features=feats)["loss"]
        assert online.detach().item() == pytest.approx(stored.detach().item(), rel=1e-5), objective
        assert stored.detach().item() > 0


def test_dense_predictor_rows_are_class_major_c_s_s(tmp_path):
    from ktray.dense_predict import make_predictor
    from ktray.models import save_model
    from ktray.models.dense import dense_targets
    from ktray.predict import normalize_on_device

    torch.manual_seed(0)
    teacher = DenseTeacher(create_backbone("test_vit", pretrained=False, img_size=32), 3).eval()
    spec = {
        "kind": "seg_teacher",
        "arch": "test_vit",
        "backbone": "test_vit",
        "head": "linear",
        "num_classes": 3,
        "img_size": 32,
        "build_img_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_model(teacher, str(tmp_path / "t"), spec)
    p = make_predictor(str(tmp_path / "t"), dense_size=4, feature_size=2, batch_size=2)
    pixels = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)
    rows, feats = p.predict_pixels(pixels)
    assert rows.shape == (3, 3 * 4 * 4) and rows.dtype == np.float16
    assert feats.shape == (3, teacher.feature_dim * 2 * 2)
    x = normalize_on_device(pixels, spec["mean"], spec["std"], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ref, _ = dense_targets(teacher, x, 4)
    got = torch.from_numpy(rows.astype(np.float32)).view(3, 3, 4, 4)  # what distill reads
    assert torch.allclose(got, ref, atol=2e-2)
