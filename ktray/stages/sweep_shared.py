"""The stage outputs every sweep trial shares, computed once under ``OUT/sweep/shared``, and
their links into a trial's folder (symlinks; on an object store copies of the manifests)."""

from __future__ import annotations

import logging
import os

from ktray import storage
from ktray.config import Config, apply_overrides
from ktray.pipeline import sweeps
from ktray.pipeline.sweep_trials import sweep_dir
from ktray.pipeline.tasks import prepare_task
from ktray.pipeline.validate import parse_method

log = logging.getLogger("ktray")


def prepare_shared(cfg: Config, params: list[sweeps.Param]) -> dict:
    """Compute the outputs every trial shares; return what the trials need to use them."""
    from ktray.stages import logits as logits_stage
    from ktray.stages import teacher as teacher_stage

    rules = sweeps.shared_stages(cfg, params)
    shared = {
        "out": storage.join(sweep_dir(cfg), "shared"),
        "teacher": "",
        "links": [],
        "superset": "",
    }
    base = apply_overrides(cfg, {"out": shared["out"]})
    if rules["data"] and not storage.is_remote(cfg.out):  # tables: cheap to remake per trial
        prepare_task(base)
        shared["links"].append("data")
    if rules["teacher"]:
        shared["teacher"] = teacher_stage.run(base)["outputs"]["model"]
        base = apply_overrides(base, {"teacher.checkpoint": shared["teacher"]})
    if rules["curate"]:
        from ktray.stages import curate as curate_stage

        curate_stage.run(base)
        shared["links"].append("curate")
    if rules["logits"]:
        logits_stage.run(base, rules["logits"])
        shared["links"].append(f"logits/{rules['logits']}")
    largest = _largest_transfer(cfg, params, rules)
    if largest is not None:
        # transfer-size trials: one pass over the largest set; trials take their slices
        big = apply_overrides(base, {"data.unlabeled_limit": largest})
        shared["superset"] = logits_stage.run(big, "in_domain")["outputs"]["parts"]
    log.info(
        "sweep: shared by every trial: %s",
        ", ".join(
            (["teacher"] if shared["teacher"] else [])
            + shared["links"]
            + (
                [f"logits of the largest transfer set ({shared['superset']})"]
                if shared["superset"]
                else []
            )
        )
        or "nothing",
    )
    return shared


def _largest_transfer(cfg: Config, params: list[sweeps.Param], rules: dict) -> int | None:
    """``data.unlabeled_limit`` of the largest trial when the sweep varies only that (with an
    in-domain student method whose teacher every trial shares), else None."""
    transfer = parse_method(cfg.sweep.method)[1]
    if (
        [p.key for p in params] != ["data.unlabeled_limit"]
        or transfer != "in_domain"
        or not rules["teacher"]
    ):
        return None
    values = [int(v) for v in params[0].values]
    return 0 if 0 in values else max(values)


# What a trial needs of a shared stage folder on an object store (no symlinks there): the
# manifest (its outputs point into the shared folder, so parts are read from there) and the
# small tables a trial reads by path.
POINTER_FILES = ("manifest.json", "config.yaml", "transfer_set.parquet")


def link(src: str, dst: str) -> None:
    """``dst`` -> ``src`` (a shared stage output seen from a trial's folder): a symlink on a
    local or mounted disk, a copy of the :data:`POINTER_FILES` on an object store."""
    if storage.is_remote(dst):
        for name in POINTER_FILES:
            target = storage.join(dst, name)
            if storage.exists(storage.join(src, name)) and not storage.exists(target):
                storage.write_bytes(target, storage.read_bytes(storage.join(src, name)))
        return
    if os.path.lexists(dst):
        return  # a rerun: already linked (or computed by the trial itself)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.abspath(src), dst, target_is_directory=True)
