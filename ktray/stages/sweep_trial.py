"""One sweep trial, in its own Ray Tune process: the method on base + the trial's values, with
the shared outputs linked into ``OUT/sweep/trial_<hash>``; reports reach Tune."""

from __future__ import annotations

import logging
import sys
import time

from ktray import storage
from ktray.config import Config, apply_overrides
from ktray.pipeline import accounting, manifest, sweeps
from ktray.pipeline.sweep_trials import RESULT_KEYS
from ktray.pipeline.validate import parse_method
from ktray.stages.common import ensure_ray, start_trial, trial_steps
from ktray.stages.sweep_shared import link

log = logging.getLogger("ktray")


def _trial_logging() -> None:
    logger = logging.getLogger("ktray")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s ktray %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _run_method(cfg: Config, method: str) -> dict:
    from ktray.stages import run as run_stage
    from ktray.stages import teacher as teacher_stage

    _, transfer = parse_method(method)
    if transfer == "curated":
        from ktray.stages import curate as curate_stage

        curate_stage.run(cfg)
    if method == "teacher":
        r = teacher_stage.run(cfg)
        return {
            **run_stage._scores(r),  # test_accuracy, or test_miou etc. (segmentation)
            "train_seconds": r.get("train_seconds"),
            "model": r["outputs"]["model"],
        }
    entry, model = run_stage._student_entry(cfg, method)
    return dict(entry, model=model)


def trial(config: dict, base: dict, shared: dict, keys: list, method: str, out_dir: str):
    """One trial, in its own Ray process: the method on base + this trial's values (its
    inputs' listings taken once, :func:`ktray.storage.listings_fixed`)."""
    with storage.listings_fixed():
        _trial(config, base, shared, keys, method, out_dir)


def _trial(config: dict, base: dict, shared: dict, keys: list, method: str, out_dir: str):
    import ray.tune

    _trial_logging()
    start_trial()
    started = time.perf_counter()
    values = {k: config[k] for k in keys}
    name = sweeps.trial_name(values)
    trial_out = storage.join(out_dir, name)
    # its values first: a trial the scheduler stops is still named by them in every report
    storage.write_json(
        storage.join(trial_out, "trial.json"),
        {"trial": name, "params": values, "method": method, "status": "running"},
    )
    stale = storage.join(trial_out, accounting.STOPPED, manifest.MANIFEST)
    if storage.exists(stale):  # an earlier, stopped attempt of this trial: this one replaces it
        fs, path = storage.fs_and_path(stale)
        fs.rm(path)
    extra = {"out": trial_out, "tracking.mlflow": False}
    if shared["teacher"]:
        extra["teacher.checkpoint"] = shared["teacher"]
    cfg = apply_overrides(apply_overrides(base, values), extra)
    for rel in shared["links"]:
        link(storage.join(shared["out"], rel), storage.join(trial_out, rel))
    ensure_ray(cfg.ray)
    if shared.get("superset"):
        from ktray.stages import logits as logits_stage

        logits_stage.slice_from(cfg, "in_domain", shared["superset"])
    log.info("sweep %s: %s", name, " ".join(f"{k}={sweeps.display(v)}" for k, v in values.items()))
    result = _run_method(cfg, method)
    result.update(
        trial=name,
        params=values,
        trial_dir=trial_out,
        method=method,
        status="done",
        wall_seconds=time.perf_counter() - started,
    )
    storage.write_json(storage.join(trial_out, "trial.json"), result)
    ray.tune.report(
        {
            **{k: result.get(k) for k in RESULT_KEYS if result.get(k) is not None},
            "trial": name,
            "ktray_done": 1,
            "pipeline_step": trial_steps(),
        }
    )
