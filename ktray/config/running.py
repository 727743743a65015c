"""Config sections of how a run is carried out: curation, Ray, MLflow tracking, export and sweeps.

Each field has a docstring and its checks beside it (``setting(...)``); each section's
``__post_init__`` checks them (see :mod:`ktray.config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ktray.config.methods import parse_method
from ktray.errors import KtrayError
from ktray.settings import check_fields, setting


@dataclass
class CurateConfig:
    gallery: str = ""
    """Gallery URI (folder, parquet shards, webdataset tars, globs and braces; local or s3://).
    Empty = the demo gallery: in-domain unlabeled images mixed with the generic pool."""
    images_per_query: int = setting(20, ge=1)
    """Distinct gallery images retrieved for every labeled (query) image."""
    encoder: str = ""
    """Retrieval encoder (timm / hf-hub / open_clip name); empty = the teacher's backbone with
    the teacher's pretrained / checkpoint settings (not the adapted teacher)."""
    pretrained: bool = True
    """Load ``encoder``'s pretrained weights (ignored when ``encoder`` is empty)."""
    img_size: int = setting(64, ge=8)
    """Encoder input side: every crop is resized to it."""
    random_crops: int = setting(0, ge=0)
    """Random crops per image (queries and gallery alike), beside the full image."""
    grid: int = setting(2, ge=0)
    """grid x grid evenly spaced crops per scale (0 = none, 1 = one centred crop)."""
    scales: list = setting(factory=lambda: [0.6])
    """Crop sides as fractions of the image side, each in (0, 1]."""
    protect_crops: bool = False
    """Embed every crop of the val/test images for near-duplicate removal (else their full
    image only, matched against every gallery crop)."""
    dedup_threshold: float = setting(0.97, gt=0, le=1)
    """Gallery images this close (cosine) to a labeled or test image are excluded."""
    memory_budget_gb: float = setting(4.0, gt=0)
    """What the FAISS index may occupy: exact Flat when it fits, else IVF-PQ."""
    k0: int = setting(0, ge=0)
    """First search depth per query crop (0 = auto: 2 x images_per_query x crops per image,
    at least 64); deepened where a query needs more."""
    max_k: int = setting(0, ge=0)
    """Deepest search per query crop (0 = no cap: a query is searched as deep as the gallery
    if it must be); a query still short at the cap is reported as shortfall (``max_k``)."""
    batch_size: int = setting(128, ge=1)
    """Crops per encoder forward pass."""
    shard_rows: int = setting(4096, ge=1)
    """Images per embedding shard (one Ray Data block, one part file)."""
    report_queries: int = setting(6, ge=0)
    """Queries shown in report.png, each beside its first retrieved images."""
    index: str = setting("auto", nonempty=True)
    """Gallery index: ``auto`` (Flat, IVF-PQ or IVF-PQ + SQ8 re-ranking by gallery size and
    ``memory_budget_gb``) or any faiss factory string (``IVF4096,PQ32``, ``HNSW32``)."""
    target_recall: float = setting(0.95, gt=0, le=1)
    """nprobe is raised until recall@10 against exact search, measured on up to 1,000 query
    crops at build time, reaches this (reported either way in the manifest)."""
    dedup_margin: float = setting(0.1, ge=0, le=1)
    """Approximate hits down to ``dedup_threshold`` minus (the index's measured score error +
    this) are re-checked with exact cosine on the stored embeddings."""
    dedup_gallery: bool = False
    """Also remove gallery self-duplicates: of full images closer than ``dedup_threshold``
    the first one (gallery order) is kept."""
    index_cpus: float = setting(1.0, gt=0)
    """CPUs of the Ray task that builds the index (and runs the leak check)."""
    index_memory_gb: float = setting(0.0, ge=0)
    """Ray ``memory`` resource of the index build task (0 = ``memory_budget_gb``), so it is
    placed on a node with that much memory free."""
    search_actors: int = setting(0, ge=0)
    """Ray actors that search query batches, each holding the index once (0 = one per
    node)."""
    search_cpus: float = setting(0.0, ge=0)
    """CPUs of each search actor, its faiss threads (0 = all CPUs of its node)."""

    def __post_init__(self):
        check_fields(self, "curate")
        if not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 1
            for s in self.scales
        ):
            raise KtrayError(f"curate.scales must be numbers in (0, 1], got {self.scales!r}")
        if not self.scales and (self.grid or self.random_crops):
            raise KtrayError(
                "curate.scales must not be empty when curate.grid or "
                "curate.random_crops asks for crops"
            )
        if self.max_k and self.k0 > self.max_k:
            raise KtrayError(f"curate.k0 must be <= curate.max_k ({self.max_k}), got {self.k0}")


@dataclass
class RayConfig:
    address: str = ""
    """Ray address; empty = connect to a running cluster if RAY_ADDRESS is set, else start a
    new local one (also when a ``ray start`` cluster runs on this machine: join that one
    with ``auto``)."""
    num_cpus: int = setting(0, ge=0)
    """CPUs of a locally started Ray (0 = all)."""
    num_workers: int = setting(0, ge=0)
    """Ray Train workers; 0 = Train V2 local mode (in-process: no ~30 s worker start-up)."""
    use_gpu: bool = False
    """Give every Ray Train worker one GPU."""
    storage_path: str = ""
    """Ray Train storage (local path or s3://); empty = OUT/ray."""
    max_failures: int = setting(0, ge=0, also=(-1,))
    """Ray Train FailureConfig.max_failures: a failed run restarts from its last checkpoint
    (every ``train.checkpoint_every`` steps, mid-epoch); -1 = without limit."""
    shared_storage: bool = False
    """Declare a local ``out=`` / ``ray.storage_path`` a mount every node shares (NFS, ...);
    without it a local path on a cluster of more than one node is refused."""

    def __post_init__(self):
        check_fields(self, "ray")


@dataclass
class TrackingConfig:
    mlflow: bool = True
    """Log the pipeline to MLflow (params, metrics, results, models)."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI if set, else sqlite:///OUT/mlflow.db."""
    experiment: str = setting("ktray", nonempty=True)
    """MLflow experiment name (created when missing)."""
    registered_model: str = "ktray-student"
    """Registered model that gets the pipeline's best student as a new version ('' = none)."""

    def __post_init__(self):
        check_fields(self, "tracking")


@dataclass
class ExportConfig:
    """``ktray export`` (ONNX files, parity check, int8) and the speed table of ``ktray run``."""

    format: str = setting("onnx", choices="ktray.export:FORMATS")
    """Export format (``onnx``: one file with a dynamic batch axis, run by onnxruntime)."""
    exporter: str = setting("dynamo", choices="ktray.export:EXPORTERS")
    """PyTorch's ONNX exporter: ``dynamo`` (torch.export, the default since PyTorch 2.9) or
    ``torchscript`` (the legacy tracer, deprecated; ~5x faster to export)."""
    int8: bool = False
    """Also write ``model.int8.onnx`` and report its agreement (and test accuracy)."""
    int8_mode: str = setting("static", choices="ktray.export:INT8_MODES")
    """``static`` (calibrated int8 activations, QDQ; 2-4x faster than fp32 on CPU CNNs) or
    ``dynamic`` (no calibration; slower than fp32 for CNNs with onnxruntime)."""
    atol: float = setting(1e-3, gt=0)
    """Largest max-abs logit difference between the fp32 ONNX model and PyTorch, times the
    largest logit magnitude when that exceeds 1."""
    check_images: int = setting(32, ge=1)
    """Fixed inputs the parity check (and int8 calibration) uses."""
    speed: bool = True
    """``ktray run``: measure the speed table (teacher and students; PyTorch and onnxruntime)."""
    speed_iters: int = setting(10, ge=1)
    """Timed iterations of each latency / throughput measurement (the median is reported)."""

    def __post_init__(self):
        check_fields(self, "export")


@dataclass
class SweepConfig:
    params: dict = setting(factory=dict)
    """Fields to sweep by dotted key: a list (grid) or ``{uniform|loguniform: [lo, hi]}`` /
    ``{choice: [...]}`` (sampled num_samples times), e.g. ``{distill.temperature: [1, 2]}``."""
    method: str = "task@in_domain"
    """The method every trial runs (``scratch``, ``teacher`` or ``OBJECTIVE@TRANSFER``)."""
    metric: str = setting("test_accuracy", choices="ktray.pipeline.sweeps:METRICS")
    """Trial result that ranks the trials (``test_accuracy``, ``distill_test_accuracy``, ...;
    segmentation tasks: ``test_miou``, ``distill_test_miou``, ``test_pixel_accuracy``)."""
    mode: str = setting("max", choices="ktray.pipeline.sweeps:MODES")
    """Whether a higher (``max``) or lower (``min``) ``metric`` is better."""
    num_samples: int = setting(1, ge=1)
    """Samples drawn for ``uniform`` / ``loguniform`` / ``choice`` parameters (per grid point)."""
    max_concurrent: int = setting(1, ge=1)
    """Trials at once (1 on a 2-CPU machine: each trial trains on every core)."""
    trial_memory_mb: int = setting(512, ge=1)
    """A trial's Ray ``memory`` resource; trials take no CPU (their Train workers and Data
    actors do), so they never starve the work they start."""
    scheduler: str = setting("fifo", choices="ktray.pipeline.sweeps:SCHEDULERS")
    """``fifo`` (every trial runs to the end) or ``asha`` (early stopping at rungs)."""
    asha_metric: str = setting("agree", nonempty=True)
    """ASHA's rung metric from the epoch reports: ``agree`` (student-teacher agreement while
    distilling), ``kd``, ``loss``, ``train_acc``, ``val_accuracy`` (with data.val_per_class)."""
    asha_mode: str = setting("max", choices="ktray.pipeline.sweeps:MODES")
    """Whether a higher (``max``) or lower (``min``) ``asha_metric`` is better."""
    grace_period: int = setting(0, ge=0)
    """ASHA: optimizer steps (distill then finetune) before a stop; 0 = max_t / 4."""
    max_t: int = setting(0, ge=0)
    """ASHA: the most optimizer steps a trial trains; 0 = distill.steps + finetune.steps."""
    reduction_factor: int = setting(2, ge=1)
    """ASHA: 1 / the fraction of trials that go on at each rung (at least 2 with asha)."""

    def __post_init__(self):
        check_fields(self, "sweep")
        parse_method(self.method)
        if self.scheduler == "asha" and self.reduction_factor < 2:
            raise KtrayError(
                f"sweep.reduction_factor must be >= 2 with the asha scheduler, "
                f"got {self.reduction_factor}"
            )
