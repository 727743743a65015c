"""What one training worker runs: teacher adaptation, distillation or finetuning (no ray here).

``run_training(spec, session)`` builds the model and data described by a plain dict ``spec``
(picklable, so Ray Train ships it to every worker), trains with
:func:`ktray.train.loop.train_steps` and has rank 0 save the final model as safetensors.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ktray import storage
from ktray.data import columns as C
from ktray.data.datasets import LabeledImages, ViewImages, collate_skip_none
from ktray.distill import DistillModule
from ktray.losses import FeatureProjector
from ktray.metrics import evaluate_classifier
from ktray.models import (TaskModel, create_backbone, create_student, load_model, save_model,
                          student_feature_dim)
from ktray.models.flops import count_flops
from ktray.train.loop import Session, train_steps, unwrap


# channels_last: oneDNN's convolutions on CPU (and tensor cores on GPU) run ~1.3-1.7x faster
# in NHWC; models and images are both kept in it.
CL = torch.channels_last


def _dev(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=CL) if x.dim() == 4 else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loader(dataset: Dataset, spec: dict, shuffle: bool, session: Session) -> DataLoader:
    sampler = None
    if session.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=session.world_size, rank=session.rank, shuffle=shuffle,
            seed=spec["seed"])
    workers = spec.get("loader_workers", 0)
    return DataLoader(dataset, batch_size=spec["batch_size"], shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=collate_skip_none,
                      drop_last=len(dataset) >= 2 * spec["batch_size"] * session.world_size,
                      persistent_workers=workers > 0)


def _set_epoch(loader: DataLoader):
    def set_epoch(epoch: int) -> None:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
    return set_epoch


def build_teacher(spec: dict) -> tuple[nn.Module, dict]:
    # img_size: ViTs (DINOv2 at 518 px natively) must be built for the size they will see
    backbone = create_backbone(spec["backbone"], pretrained=spec["pretrained"],
                               checkpoint=spec.get("checkpoint") or None,
                               img_size=spec.get("img_size") or None)
    model = TaskModel(backbone, spec["num_classes"])
    model.set_trainable(spec["mode"], partial_blocks=spec.get("partial_blocks", 2))
    size = spec.get("img_size") or backbone.default_img_size
    model_spec = {"kind": "teacher", "arch": spec["backbone"], "backbone": spec["backbone"],
                  "num_classes": spec["num_classes"], "img_size": size,
                  "mean": list(backbone.mean), "std": list(backbone.std), "mode": spec["mode"]}
    return model, model_spec


def build_student(spec: dict) -> tuple[nn.Module, dict]:
    s = spec["student"]
    init_dir = spec.get("init_dir") or ""
    if init_dir:
        model, model_spec = load_model(init_dir)
        if model_spec["num_classes"] != spec["num_classes"]:
            model.reset_classifier(spec["num_classes"])
        model_spec = dict(model_spec, num_classes=spec["num_classes"])
        return model, model_spec
    model = create_student(s["arch"], spec["num_classes"], pretrained=s["pretrained"],
                           checkpoint=s.get("checkpoint") or None, img_size=s["img_size"])
    cfg = model.pretrained_cfg if hasattr(model, "pretrained_cfg") else {}
    model_spec = {"kind": "student", "arch": s["arch"], "num_classes": spec["num_classes"],
                  "img_size": s["img_size"],
                  "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
                  "std": list(cfg.get("std", (0.229, 0.224, 0.225)))}
    return model, model_spec


@torch.no_grad()
def _cached_features(model, dataset: Dataset, views: int, device) -> TensorDataset:
    """Frozen-backbone features of ``views`` random augmented views of every labeled image."""
    loader = DataLoader(dataset, batch_size=128, shuffle=False, collate_fn=collate_skip_none)
    backbone = model.backbone.to(device, memory_format=CL).eval()
    feats, labels = [], []
    for epoch in range(views):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        for x, y in loader:
            feats.append(backbone(_dev(x, device)).float().cpu())
            labels.append(y)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


def _classifier_run(model, model_spec, spec, session) -> dict:
    """Supervised training on labeled images (teacher adaptation and finetuning).

    A linear probe (frozen backbone) runs the backbone once per cached augmented view and
    trains the head on the cached features: the same optimisation for a fraction of the
    backbone passes of running it at every step.
    """
    size, mean, std = model_spec["img_size"], model_spec["mean"], model_spec["std"]
    train = storage.read_parquet(spec["train_uri"])
    dataset = LabeledImages(train, size, mean, std, train=True, seed=spec["seed"])
    full = model
    probe_views = spec.get("probe_views", 0)
    if spec["kind"] == "teacher" and spec["mode"] == "linear" and probe_views > 0:
        dataset = _cached_features(model, dataset, probe_views, session.device)
        model = _HeadOnly(model.head)  # shares the head; the backbone stays out of DDP
    loader = session.prepare_loader(_loader(dataset, spec, True, session))
    module = session.prepare_model(model.to(memory_format=CL))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.get("label_smoothing", 0.0))
    device = session.device

    def step(m, batch):
        x, y = batch
        x, y = _dev(x, device), y.to(device)
        logits = m(x)
        loss = loss_fn(logits, y)
        return {"loss": loss, "n": len(y), "train_acc": (logits.argmax(-1) == y).float().mean()}

    extra = None
    if spec.get("val_uri"):
        val = storage.read_parquet(spec["val_uri"])
        val_loader = DataLoader(LabeledImages(val, size, mean, std, train=False),
                                batch_size=256, collate_fn=collate_skip_none)

        def extra():
            r = evaluate_classifier(full.to(device), val_loader, device)
            return {"val_accuracy": r["test_accuracy"]}

    params = [p for p in module.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    metrics = train_steps(module, step, loader, session, steps=spec["steps"], lr=spec["lr"],
                          weight_decay=spec["weight_decay"], warmup_steps=spec["warmup_steps"],
                          set_epoch=_set_epoch(loader), extra_metrics=extra,
                          report_every=spec.get("report_every", 50))
    metrics["trainable_params"] = trainable
    return metrics


class _HeadOnly(nn.Module):
    """The task head applied to cached features (linear probe)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)


class _TwoSizes(Dataset):
    """The same stored view at the student's and at the teacher's input size (online)."""

    def __init__(self, student: ViewImages, teacher: ViewImages):
        self.student, self.teacher = student, teacher

    def __len__(self):
        return len(self.student)

    def __getitem__(self, i):
        a, b = self.student[i], self.teacher[i]
        if a is None or b is None:
            return None
        return {"x": a["x"], "xt": b["x"], "index": a["index"]}


def _distill_run(model, model_spec, spec, session) -> dict:
    rows = storage.read_parquet(spec["targets_uri"])
    objective, online = spec["objective"], spec["teacher_mode"] == "online"
    teacher, teacher_spec = None, None
    if online or objective == "features":
        teacher, teacher_spec = load_model(spec["teacher_dir"])
    projector = None
    if objective == "features":
        dim = len(rows[C.FEATURES][0]) if C.FEATURES in rows.column_names else \
            teacher.backbone.feature_dim
        projector = FeatureProjector(student_feature_dim(model), dim)
    module = DistillModule(model, teacher if online else None, objective=objective,
                           loss=spec["loss"], temperature=spec["temperature"],
                           projector=projector)
    size, mean, std = model_spec["img_size"], model_spec["mean"], model_spec["std"]
    dataset = ViewImages(rows, size, mean, std)
    if online:
        dataset = _TwoSizes(dataset, ViewImages(rows, teacher_spec["img_size"],
                                                teacher_spec["mean"], teacher_spec["std"]))
        targets = None
    else:
        column = C.LOGITS if objective == "task" else C.FEATURES
        targets = torch.tensor(np.asarray(rows[column].to_pylist(), dtype=np.float32))
    loader = session.prepare_loader(_loader(dataset, spec, True, session))
    module = session.prepare_model(module.to(memory_format=CL))
    device = session.device

    def step(m, batch):
        x = _dev(batch["x"], device)
        if online:
            out = m(x, x_teacher=_dev(batch["xt"], device))
        else:
            t = targets[batch["index"]].to(device)
            kw = {"teacher_logits": t} if objective == "task" else {"teacher_features": t}
            out = m(x, **kw)
        out["n"] = len(x)
        return out

    metrics = train_steps(module, step, loader, session, steps=spec["steps"], lr=spec["lr"],
                          weight_decay=spec["weight_decay"], warmup_steps=spec["warmup_steps"],
                          set_epoch=_set_epoch(loader), report_every=spec.get("report_every", 1))
    if online:  # the online teacher's forward passes count towards the pretraining compute
        metrics["teacher_flops_per_image"] = count_flops(teacher, teacher_spec["img_size"])
    return metrics


def run_training(spec: dict, session: Session) -> dict:
    """Train what ``spec["kind"]`` names and save it under ``spec["out_dir"]`` (rank 0)."""
    seed_everything(spec["seed"] + session.rank)
    kind = spec["kind"]
    model, model_spec = build_teacher(spec) if kind == "teacher" else build_student(spec)
    if kind == "distill":
        metrics = _distill_run(model, model_spec, spec, session)
    else:
        metrics = _classifier_run(model, model_spec, spec, session)
    size = model_spec["img_size"]
    fwd = count_flops(unwrap(model), size)
    # Training costs ~3x the forward FLOPs (forward + backward); a frozen backbone ~1x.
    factor = 3.0 if kind != "teacher" or spec["mode"] != "linear" else 1.0
    metrics["flops_per_image"] = fwd
    metrics["flops"] = fwd * factor * metrics.get("images", 0)
    metrics["flops"] += metrics.pop("teacher_flops_per_image", 0.0) * metrics.get("images", 0)
    if session.rank == 0:
        model_spec["train"] = {k: spec[k] for k in ("kind", "steps", "lr", "seed")}
        save_model(unwrap(model).cpu(), spec["out_dir"], model_spec)
    return metrics
