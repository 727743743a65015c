"""What one training worker runs: teacher adaptation, distillation or finetuning (no ray here).

``run_training(config, session)`` rebuilds the typed spec from ``config["spec"]``
(``dataclasses.asdict`` of a :mod:`ktray.train.specs` spec: picklable, so Ray Train ships it to
every worker), builds the model and data it describes from it and ``config["inputs"]`` (where
the upstream outputs are), trains with :func:`ktray.train.loop.train_steps` and has rank 0
save the final model as safetensors (finetuning with a validation split: the weights its
:class:`ktray.train.select.Selector` chose).

Distillation reads its rows from ``session.dataset("train")``: a Ray Data shard in Ray Train
(``iter_torch_batches`` with a local shuffle buffer and prefetching), uint8 views decoded by
a CPU stage upstream and normalised here on the device. Teacher adaptation and finetuning
(a few labeled images) keep a map-style DataLoader.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ktray import storage
from ktray.data.datasets import LabeledImages, collate_skip_none, normalize
from ktray.distill import DistillModule, mix_views
from ktray.losses import FeatureProjector
from ktray.metrics import evaluate_classifier
from ktray.models import (
    TaskModel,
    create_backbone,
    create_student,
    load_model,
    student_feature_dim,
)
from ktray.models.flops import count_flops
from ktray.train.finish import finish_run
from ktray.train.loop import Session, train_spec
from ktray.train.select import Selector
from ktray.train.specs import DistillSpec, FinetuneSpec, TeacherSpec, from_dict, resolve_precision

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


def worker_batch(batch_size: int, world_size: int) -> int:
    """Rows one worker takes per step: a config's ``batch_size`` is global (over all Ray Train
    workers), so a run means the same with 1 or N workers; rounded up when N does not divide
    it (the global batch is then up to N-1 rows larger)."""
    return -(-int(batch_size) // max(1, int(world_size)))


def _loader(dataset: Dataset, spec, shuffle: bool, session: Session) -> DataLoader:
    sampler = None
    if session.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset,
            num_replicas=session.world_size,
            rank=session.rank,
            shuffle=shuffle,
            seed=spec.seed,
        )
    return DataLoader(
        dataset,
        batch_size=worker_batch(spec.batch_size, session.world_size),
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=collate_skip_none,
        drop_last=len(dataset) >= 2 * spec.batch_size,
        pin_memory=session.device.type == "cuda",
    )


def _set_epoch(loader: DataLoader):
    def set_epoch(epoch: int) -> None:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)

    return set_epoch


def build_teacher(spec: TeacherSpec, num_classes: int) -> tuple[nn.Module, dict]:
    # img_size: ViTs (DINOv2 at 518 px natively) must be built for the size they will see
    backbone = create_backbone(
        spec.backbone,
        pretrained=spec.pretrained,
        checkpoint=spec.checkpoint or None,
        img_size=spec.img_size or None,
    )
    model = TaskModel(backbone, num_classes)
    model.set_trainable(spec.mode, partial_blocks=spec.partial_blocks)
    size = spec.img_size or backbone.default_img_size
    model_spec = {
        "kind": "teacher",
        "arch": spec.backbone,
        "backbone": spec.backbone,
        "num_classes": num_classes,
        "img_size": size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "mode": spec.mode,
    }
    return model, model_spec


def build_student(
    spec: DistillSpec | FinetuneSpec, num_classes: int, init_dir: str = ""
) -> tuple[nn.Module, dict]:
    if init_dir:
        model, model_spec = load_model(init_dir)
        if model_spec["num_classes"] != num_classes:
            model.reset_classifier(num_classes)
        return model, dict(model_spec, num_classes=num_classes)
    model = create_student(
        spec.student_arch,
        num_classes,
        pretrained=spec.student_pretrained,
        checkpoint=spec.student_checkpoint or None,
        img_size=spec.student_img_size,
    )
    cfg = model.pretrained_cfg if hasattr(model, "pretrained_cfg") else {}
    model_spec = {
        "kind": "student",
        "arch": spec.student_arch,
        "num_classes": num_classes,
        "img_size": spec.student_img_size,
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
    }
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


def _precision(spec, session: Session) -> str:
    return resolve_precision(spec.precision, session.device.type)


def _compiled(module: nn.Module, spec) -> nn.Module:
    return torch.compile(module) if spec.compile else module


def _classifier_run(
    model, model_spec, spec: TeacherSpec | FinetuneSpec, inputs: dict, session
) -> dict:
    """Supervised training on labeled images (teacher adaptation and finetuning).

    With a validation split, finetuning keeps the weights ``spec.select`` chooses (best
    validation accuracy of the evaluations at step 0, every ``spec.val_every`` steps and at
    the end, or the last step; see :mod:`ktray.train.select`); the teacher reports its
    validation accuracy at each report and keeps its last step.

    A linear probe (frozen backbone) runs the backbone once per cached augmented view and
    trains the head on the cached features: the same optimisation for a fraction of the
    backbone passes of running it at every step.
    """
    size, mean, std = model_spec["img_size"], model_spec["mean"], model_spec["std"]
    train = storage.read_parquet(inputs["train_uri"])
    dataset = LabeledImages(train, size, mean, std, train=True, seed=spec.seed)
    full = model
    if isinstance(spec, TeacherSpec) and spec.mode == "linear" and spec.probe_views > 0:
        dataset = _cached_features(model, dataset, spec.probe_views, session.device)
        model = _HeadOnly(model.head)  # shares the head; the backbone stays out of DDP
    loader = session.prepare_loader(_loader(dataset, spec, True, session))
    state_module = model
    module = session.prepare_model(_compiled(model.to(memory_format=CL), spec))
    loss_fn = nn.CrossEntropyLoss()
    device = session.device

    def step(m, batch):
        x, y = batch
        x, y = _dev(x, device), y.to(device, non_blocking=True)
        logits = m(x)
        loss = loss_fn(logits.float(), y)
        return {"loss": loss, "n": len(y), "train_acc": (logits.argmax(-1) == y).float().mean()}

    extra, selector = None, None
    if inputs.get("val_uri"):
        val = storage.read_parquet(inputs["val_uri"])
        val_loader = DataLoader(
            LabeledImages(val, size, mean, std, train=False),
            batch_size=256,
            collate_fn=collate_skip_none,
        )

        def val_accuracy() -> float:  # the full val set, fp32, in order: deterministic
            return evaluate_classifier(full.to(device), val_loader, device)["test_accuracy"]

        if isinstance(spec, FinetuneSpec):  # chosen on validation (finetune.select)
            selector = Selector(
                val_accuracy,
                state_module,
                rank=session.rank,
                world_size=session.world_size,
                device=session.device,
                every=spec.val_every,
                patience=spec.patience,
                policy=spec.select,
            )
        else:

            def extra():
                return {"val_accuracy": val_accuracy()}

    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    metrics = train_spec(
        module,
        step,
        loader,
        session,
        spec,
        set_epoch=_set_epoch(loader),
        extra_metrics=extra,
        precision=_precision(spec, session),
        state_module=state_module,
        selector=selector,
    )
    if selector is None:  # no validation split: the last step's weights
        metrics.update(selected_step=metrics["step"], select="last", val_history=[])
    metrics["trainable_params"] = trainable
    return metrics


class _HeadOnly(nn.Module):
    """The task head applied to cached features (linear probe)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feats):
        return self.head(feats)


class _ShardBatches:
    """Re-iterable batches of a Ray Data shard (or :class:`ktray.data.datasets.ViewStream`):
    one ``iter_torch_batches`` pass per epoch, on the host (pinned when training on a GPU)."""

    def __init__(
        self,
        shard,
        spec: DistillSpec,
        drop_last: bool,
        pin: bool,
        world_size: int = 1,
        rank: int = 0,
        passes: int = 1,
    ):
        self.shard, self.spec, self.drop_last, self.pin = shard, spec, drop_last, pin
        self.passes = passes  # over the transfer set in one iteration (train_data.view_dataset)
        self.batch_size = worker_batch(spec.batch_size, world_size)  # spec's is global
        self.rank, self.epoch = rank, 0

    def __iter__(self):
        kw = dict(
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            local_shuffle_buffer_size=self.spec.shuffle_buffer or None,
            prefetch_batches=self.spec.prefetch_batches,
            device="cpu",
        )
        if self.spec.reproducible and self.spec.shuffle_buffer:  # its own draw every epoch
            key = [self.spec.seed, self.rank, self.epoch]
            kw["local_shuffle_seed"] = int(np.random.SeedSequence(key).generate_state(1)[0])
        self.epoch += 1
        if self.pin:
            kw["pin_memory"] = True
        return iter(self.shard.iter_torch_batches(**kw))


def shard_batches(session, spec: DistillSpec, inputs: dict) -> _ShardBatches:
    """This worker's distillation batches (classification and segmentation alike): its share
    of the global ``spec.batch_size``, the shuffle seeded by ``spec.seed`` and its rank, the
    last partial batch dropped unless the set (``inputs["rows"]``) is smaller than two global
    batches; ``inputs["passes"]``: over the set in one iteration of the dataset."""
    rows = int(inputs.get("rows") or 0)
    return _ShardBatches(
        session.dataset("train"),
        spec,
        drop_last=rows >= 2 * spec.batch_size,
        pin=session.device.type == "cuda",
        world_size=session.world_size,
        rank=session.rank,
        passes=int(inputs.get("passes") or 1),
    )


def _distill_run(model, model_spec, spec: DistillSpec, inputs: dict, session) -> dict:
    device, precision = session.device, _precision(spec, session)
    teacher, teacher_spec, teacher_fpi = None, None, 0.0
    if spec.online:
        teacher, teacher_spec = load_model(inputs["teacher_dir"])
        teacher_fpi = count_flops(teacher, teacher_spec["img_size"])
    projector = None
    if spec.objective == "features":
        dim = inputs.get("feature_dim") or teacher.backbone.feature_dim
        projector = FeatureProjector(student_feature_dim(model), dim)
    module = DistillModule(
        model,
        teacher,
        objective=spec.objective,
        loss=spec.loss,
        temperature=spec.temperature,
        projector=projector,
    )
    module.to(device, memory_format=CL)
    if teacher is not None and precision == "bf16":
        module.teacher_bf16()
    net = module.net  # what checkpoints hold: student (+ projector), never the teacher
    module.wrap_net(lambda m: session.prepare_model(_compiled(m, spec)))
    loader = shard_batches(session, spec, inputs)
    mean, std = model_spec["mean"], model_spec["std"]
    target = spec.target_column

    def step(m, batch):
        x = normalize(batch["x"], mean, std, device)
        if spec.online:
            xt = normalize(batch["xt"], teacher_spec["mean"], teacher_spec["std"], device)
            if spec.mixup > 0:
                x, xt = mix_views(x, xt, spec.mixup)
            out = m(x, x_teacher=xt)
        else:
            t = batch[target].to(device, non_blocking=True).float()
            kw = {"teacher_logits": t} if spec.objective == "task" else {"teacher_features": t}
            out = m(x, **kw)
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
    # the online teacher's forward passes count towards the pretraining compute
    metrics["teacher_flops_per_image"] = teacher_fpi
    return metrics


def run_training(config: dict, session: Session) -> dict:
    """Train what ``config["spec"]`` describes with ``config["inputs"]`` (``out_dir``,
    ``num_classes``, ``train_uri`` / ``val_uri`` / ``init_dir`` / ``teacher_dir`` /
    ``feature_dim`` / ``rows`` as the kind needs) and save it under ``out_dir`` (rank 0)."""
    spec, inputs = from_dict(config["spec"]), config["inputs"]
    seed_everything(spec.seed + session.rank)
    if spec.task_type == "segmentation":
        from ktray.train.seg_worker import run_seg_training

        return run_seg_training(spec, inputs, session)
    n = inputs["num_classes"]
    if isinstance(spec, TeacherSpec):
        model, model_spec = build_teacher(spec, n)
    else:
        model, model_spec = build_student(spec, n, inputs.get("init_dir", ""))
    if isinstance(spec, DistillSpec):
        metrics = _distill_run(model, model_spec, spec, inputs, session)
    else:
        metrics = _classifier_run(model, model_spec, spec, inputs, session)
    return finish_run(model, model_spec, spec, metrics, inputs["out_dir"], session.rank)
