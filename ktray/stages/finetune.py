"""``ktray finetune``: train the student on the labeled images (Ray Train).

The method names where the student starts (:mod:`ktray.config.methods`): ``scratch`` (random
init), ``init@imagenet`` (the arch's pretrained weights), ``init@PATH`` (a checkpoint), or a
distilled student (``task@in_domain``, ``task@in_domain+init@imagenet``, ...), distilled first
when not already done. Every method finetunes under one policy (``finetune.*``: the same
steps and schedule; ``finetune.lr`` from pretrained weights, ``finetune.scratch_lr`` from
random init) into ``OUT/finetune/<method>``. With a validation split every method keeps the
weights ``finetune.select`` chooses (best validation accuracy by default; the manifest names
the step: ``selected_step``, ``val_accuracy``, ``val_history``).
The labeled sets are small (tens to thousands of images): they keep a map-style DataLoader
over images decoded in the worker, which starts at once where a Ray Data pipeline pays its
start-up every run.
"""

from __future__ import annotations

import hashlib

from ktray.config import Config, apply_overrides
from ktray.config import methods as methods_mod
from ktray.errors import KtrayError
from ktray.pipeline import replicates
from ktray.pipeline.tasks import prepare_task
from ktray.stages import distill as distill_stage
from ktray.stages.train_stage import run_train_stage, table_fingerprint
from ktray.train.specs import FinetuneSpec


def student_method(method: str) -> methods_mod.Method:
    """The parsed student method (``''`` = ``scratch``); refuses ``teacher``."""
    m = methods_mod.parse(method or "scratch")
    if not m.student:
        raise KtrayError(f"'{method}' is not a student method (finetune trains the student)")
    return m


def method_config(cfg: Config, method: str) -> Config:
    """``cfg`` with the ``student.*`` starting weights ``method`` names."""
    return apply_overrides(cfg, student_method(method).student_overrides())


def check_inits(cfg: Config, methods: list[str]) -> None:
    """Before any work: every student method's starting weights can be had (pretrained
    weights cached or shipped, a checkpoint that exists and fits the arch), and no
    ``student.pretrained`` / ``student.checkpoint`` set by hand. Raises KtrayError naming the
    method."""
    from ktray.models import available

    methods_mod.check_student_init(cfg)
    s = cfg.student
    for name in methods:
        m = methods_mod.parse(name)
        if not m.student or not m.init:
            continue
        o = m.student_overrides()
        try:
            available.check_student(
                s.arch, o["student.pretrained"], o["student.checkpoint"], s.img_size
            )
        except KtrayError as e:
            raise KtrayError(f"method {name}: {e}") from None


def _weights_digest(path: str) -> str:
    """Content hash of a checkpoint's weights file (a changed file is a new start)."""
    from ktray.models.student import checkpoint_file

    h = hashlib.sha256()
    with open(checkpoint_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run(cfg: Config, init: str = "") -> dict:
    """Finetune the student of method ``init`` (``''``/``scratch``, ``init@WEIGHTS``,
    ``OBJECTIVE@TRANSFER[+init@WEIGHTS]``); manifest outputs: ``model``."""
    m = student_method(init)
    check_inits(cfg, [m.name])
    cfg = method_config(cfg, m.name)
    init_dir, init_hash = "", ""
    if m.distills:
        pre = distill_stage.run(cfg, m.transfer, m.objective, name=m.distill_name)
        init_dir, init_hash = pre["outputs"]["model"], pre["config_hash"]
    elif m.init and m.init != methods_mod.IMAGENET:
        init_hash = _weights_digest(m.init)
    spec = FinetuneSpec.from_config(cfg, scratch=m.objective == "scratch")
    info = prepare_task(cfg)
    train_uri, val_uri = info["outputs"]["train"], info["outputs"].get("val", "")
    inputs = {"train_uri": train_uri, "val_uri": val_uri, "init_dir": init_dir}
    hash_inputs = {
        "train": table_fingerprint(train_uri, files=True),  # a labeled image replaced: retrain
        "val": table_fingerprint(val_uri, files=True),
        "num_classes": info["num_classes"],
        "init": init_hash,
    }
    extra = {"method": m.name, "init": m.init or "random"}  # the weights it started from
    name = replicates.stage_name(m.name, cfg.train.seed)  # a replicate's own output (seeds=N)
    return run_train_stage(cfg, "finetune", name, spec, inputs, hash_inputs, extra=extra)
