"""What one training worker runs for a segmentation task (no ray here).

:func:`ktray.train.worker.run_training` hands specs whose ``task_type`` is ``segmentation``
here. The teacher is a :class:`~ktray.models.dense.DenseTeacher` trained with per-pixel
cross-entropy (``ignore_index`` left out) on the labeled images and their masks; in ``linear``
mode the frozen backbone runs once on ``probe_views`` random views per image (features cached
as float16 with the views' masks) and the head trains on them. Finetuning trains a
:class:`~ktray.models.dense.DenseStudent` the same way. Distillation reads the same Ray Data
view rows as classification; its targets are the teacher's flattened per-pixel logits
``[C * s * s]`` (or dense features ``[D * f * f]``), reshaped here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ktray import storage
from ktray.data.datasets import normalize
from ktray.data.segmentation import SegImages, collate_seg
from ktray.dense_distill import DenseDistillModule
from ktray.models import load_model
from ktray.models.dense import DenseStudent, build_dense_teacher
from ktray.models.flops import count_flops
from ktray.seg_metrics import evaluate_segmenter
from ktray.train.finish import finish_run
from ktray.train.loop import train_spec
from ktray.train.specs import DistillSpec, TeacherSpec, resolve_precision

CL = torch.channels_last


def build_seg_teacher(spec: TeacherSpec, num_classes: int) -> tuple[nn.Module, dict]:
    model = build_dense_teacher(
        spec.backbone,
        num_classes,
        spec.head or "linear",
        pretrained=spec.pretrained,
        checkpoint=spec.checkpoint or None,
        img_size=spec.img_size or None,
    )
    model.set_trainable(spec.mode, partial_blocks=spec.partial_blocks or 2)
    b = model.backbone
    return model, {
        "kind": "seg_teacher",
        "arch": spec.backbone,
        "backbone": spec.backbone,
        "head": spec.head or "linear",
        "num_classes": num_classes,
        "img_size": spec.img_size or b.default_img_size,
        "build_img_size": spec.img_size or None,
        "mean": list(b.mean),
        "std": list(b.std),
        "feature_dim": model.feature_dim,
        "mode": spec.mode,
    }


def build_seg_student(spec, num_classes: int, init_dir: str = "") -> tuple[nn.Module, dict]:
    if init_dir:
        model, model_spec = load_model(init_dir)
        return model, model_spec
    model = DenseStudent(
        spec.student_arch, num_classes, spec.student_head or "fpn", spec.student_pretrained
    )
    if spec.student_checkpoint:
        from ktray.models.weights import load_state_dict_into

        state = load_model(spec.student_checkpoint)[0].state_dict()
        load_state_dict_into(model, state, f"student checkpoint {spec.student_checkpoint}")
    return model, {
        "kind": "seg_student",
        "arch": spec.student_arch,
        "head": spec.student_head or "fpn",
        "num_classes": num_classes,
        "img_size": spec.student_img_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "feature_dim": model.feature_dim,
    }


def pixel_ce(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-pixel cross-entropy; logits upsampled (bilinear) to the masks' size."""
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(
            logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
    return F.cross_entropy(logits.float(), masks, ignore_index=ignore_index)


class _Head(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)


@torch.no_grad()
def _cached(model, dataset: SegImages, views: int, device) -> TensorDataset:
    loader = DataLoader(dataset, batch_size=32, shuffle=False, collate_fn=collate_seg)
    dense = model.dense.to(device, memory_format=CL).eval()
    feats, masks = [], []
    for _ in range(views):
        for x, m in loader:
            feats.append(dense(x.to(device, memory_format=CL)).to(torch.float16).cpu())
            masks.append(m)
    return TensorDataset(torch.cat(feats), torch.cat(masks))


def _supervised(model, model_spec, spec, inputs: dict, session) -> dict:
    device = session.device
    train = storage.read_parquet(inputs["train_uri"])
    size, mean, std = model_spec["img_size"], model_spec["mean"], model_spec["std"]
    dataset = SegImages(train, size, mean, std, train=True, seed=spec.seed)
    trained = model
    if isinstance(spec, TeacherSpec) and spec.mode == "linear" and spec.probe_views > 0:
        dataset = _cached(model, dataset, spec.probe_views, device)
        trained = _Head(model.head)
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size,
        shuffle=True,
        collate_fn=None if isinstance(dataset, TensorDataset) else collate_seg,
        drop_last=len(dataset) >= 2 * spec.batch_size,
    )
    module = session.prepare_model(trained.to(memory_format=CL))
    ignore = spec.ignore_index

    def step(m, batch):
        x, y = batch
        x, y = x.to(device).float().contiguous(memory_format=CL), y.to(device)
        logits = m(x)
        loss = pixel_ce(logits, y, ignore)
        return {"loss": loss, "n": len(y)}

    metrics = train_spec(
        module,
        step,
        loader,
        session,
        spec,
        precision=resolve_precision(spec.precision, device.type),
        state_module=trained,
    )
    if inputs.get("val_uri"):
        val = storage.read_parquet(inputs["val_uri"])
        loader = DataLoader(
            SegImages(val, size, mean, std, train=False), batch_size=32, collate_fn=collate_seg
        )
        r = evaluate_segmenter(model, loader, device, model_spec["num_classes"], ignore)
        metrics["val_miou"] = r["miou"]
    metrics["trainable_params"] = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    return metrics


def _distill(model, model_spec, spec: DistillSpec, inputs: dict, session) -> dict:
    from ktray.train.worker import shard_batches  # the shared Ray Data batch iterator

    device = session.device
    precision = resolve_precision(spec.precision, device.type)
    teacher, teacher_spec, teacher_fpi = None, None, 0.0
    if spec.online:
        teacher, teacher_spec = load_model(inputs["teacher_dir"])
        teacher_fpi = count_flops(teacher, teacher_spec["img_size"])
    n_classes = model_spec["num_classes"]
    f2 = max(1, spec.dense_feature_size) ** 2
    if teacher is not None:
        teacher_dim = int(teacher.feature_dim)
    else:  # stored rows hold D * f * f values
        teacher_dim = int(inputs.get("feature_dim") or 0) // f2
    module = DenseDistillModule(
        model,
        teacher,
        objective=spec.objective,
        temperature=spec.temperature or 1.0,
        feature_loss=spec.loss if spec.loss in ("cosine", "mse") else "cosine",
        teacher_dim=teacher_dim,
        dense_size=spec.dense_size,
        feature_size=spec.dense_feature_size,
    )
    module.to(device, memory_format=CL)
    if teacher is not None and precision == "bf16":
        module.teacher_bf16()
    net = module.net
    module.wrap_net(session.prepare_model)
    # distill.batch_size is global: each of N workers takes 1/N of it (as classification)
    loader = shard_batches(session, spec, inputs)
    mean, std = model_spec["mean"], model_spec["std"]
    s, f = spec.dense_size, spec.dense_feature_size

    def step(m, batch):
        x = normalize(batch["x"], mean, std, device)
        if spec.online:
            xt = normalize(batch["xt"], teacher_spec["mean"], teacher_spec["std"], device)
            out = m(x, x_teacher=xt)
        elif spec.objective == "task":
            t = batch["logits"].to(device).float().view(len(x), n_classes, s, s)
            out = m(x, teacher_logits=t)
        else:
            t = batch["features"].to(device).float().view(len(x), teacher_dim, f, f)
            out = m(x, teacher_features=t)
        out["n"] = len(x)
        return out

    metrics = train_spec(
        module,
        step,
        loader,
        session,
        spec,
        precision=precision,
        state_module=net,
    )
    metrics["teacher_flops_per_image"] = teacher_fpi
    return metrics


def run_seg_training(spec, inputs: dict, session) -> dict:
    """Train the segmentation model ``spec`` describes and save it (rank 0)."""
    n = inputs["num_classes"]
    if isinstance(spec, TeacherSpec):
        model, model_spec = build_seg_teacher(spec, n)
    else:
        model, model_spec = build_seg_student(spec, n, inputs.get("init_dir", ""))
    if isinstance(spec, DistillSpec):
        metrics = _distill(model, model_spec, spec, inputs, session)
    else:
        metrics = _supervised(model, model_spec, spec, inputs, session)
    return finish_run(model, model_spec, spec, metrics, inputs["out_dir"], session.rank)
