"""``ktray sweep``: Ray Tune over any config field (the config's ``sweep`` section).

The driver checks the sweep before Ray starts, then computes once, under ``OUT/sweep/shared``,
the stage outputs no swept key changes (the data tables, the adapted teacher, the curated set,
the teacher's logits; for a sweep of ``data.unlabeled_limit`` alone, the logits of the largest
transfer set, which each trial slices instead of recomputing) and starts a Tuner. Each trial is
a function trainable that builds its Config (base + the trial's values, ``out =
OUT/sweep/trial_<hash of its values>``), adopts the shared teacher checkpoint, links the other
shared outputs into its folder (symlinks; on an object store copies of their manifests, which
point into the shared folder) and runs ``sweep.method`` through the ordinary stages, which call
``TorchTrainer.fit``. Every training epoch report reaches Tune (TuneReportCallback with Ray
Train workers; the session itself in local mode) with ``pipeline_step``, the trial's optimizer
steps so far, which ASHA uses as time.

Trials take only a ``memory`` resource and no CPU, so on a 2-CPU machine the Ray Train workers
and Ray Data actors they start always find the CPUs free (measured on Ray 2.60: a trial
holding CPU deadlocks with 2 train workers); ``sweep.max_concurrent`` caps trials at once.

Results: ``OUT/sweep/results.{md,parquet}``, accuracy against the swept values (PNG), against
transfer-set size and against pretraining compute (only when the trials differ in it), an
MLflow parent run with one child run per trial and the sweep manifest (totals of FLOPs and
device-seconds). A trial writes ``trial.json`` (its values) when it starts; one the ASHA
scheduler stops gets a ``stopped`` manifest for the stage it was in (steps, images, seconds and
FLOPs up to its last report), so the totals and ``ktray report`` include what it spent.
"""

from __future__ import annotations

import logging
import os
import time

from ktray.config import Config, to_dict
from ktray.errors import KtrayError
from ktray.pipeline import accounting, manifest, sweeps
from ktray.pipeline.sweep_results import write_sweep_results
from ktray.pipeline.sweep_trials import sweep_dir, trial_rows
from ktray.pipeline.tracking import log_sweep, tracking_uri
from ktray.pipeline.validate import parse_method
from ktray.stages.common import ensure_ray, storage_path
from ktray.stages.nodes import check_shared_storage
from ktray.stages.sweep_shared import prepare_shared
from ktray.stages.sweep_trial import trial

log = logging.getLogger("ktray")


def _search_space(params: list[sweeps.Param]) -> dict:
    from ray import tune

    space = {}
    for p in params:
        lo, hi = (p.values + [None, None])[:2]
        if p.kind == "grid":
            space[p.key] = tune.grid_search(p.values)
        elif p.kind == "choice":
            space[p.key] = tune.choice(p.values)
        elif p.kind == "uniform":
            space[p.key] = tune.randint(int(lo), int(hi) + 1) if p.integer else tune.uniform(lo, hi)
        else:
            space[p.key] = (
                tune.lograndint(int(lo), int(hi) + 1) if p.integer else tune.loguniform(lo, hi)
            )
    return space


def _tune(cfg: Config, params: list[sweeps.Param], shared: dict):
    from ray import tune

    s = cfg.sweep
    trainable = tune.with_parameters(
        trial,
        base=to_dict(cfg),
        shared=shared,
        keys=[p.key for p in params],
        method=s.method,
        out_dir=sweep_dir(cfg),
    )
    trainable = tune.with_resources(trainable, {"memory": s.trial_memory_mb * 2**20})
    scheduler = None
    if s.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # Epoch reports of other stages lack the rung metric: ASHA skips those.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        grace, max_t = sweeps.asha_limits(cfg)
        scheduler = ASHAScheduler(
            time_attr="pipeline_step",
            metric=s.asha_metric,
            mode=s.asha_mode,
            max_t=max_t,
            grace_period=grace,
            reduction_factor=s.reduction_factor,
        )
    tuner = tune.Tuner(
        trainable,
        param_space=_search_space(params),
        tune_config=tune.TuneConfig(
            num_samples=s.num_samples, scheduler=scheduler, max_concurrent_trials=s.max_concurrent
        ),
        run_config=tune.RunConfig(
            name=f"sweep-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path(cfg),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    return tuner.fit()


def run(cfg: Config) -> dict:
    """Run the sweep of ``cfg.sweep``; return ``{"rows", "best", "outputs", ...}``."""
    params = sweeps.parse(cfg)  # every key and value checked before Ray starts
    from ktray.stages.finetune import check_inits

    if cfg.sweep.method != "teacher":
        check_inits(cfg, [cfg.sweep.method])  # init@ weights exist and fit, before Ray
    if parse_method(cfg.sweep.method)[1] == "curated":
        import importlib.util

        if importlib.util.find_spec("ktray.stages.curate") is None:
            raise KtrayError(
                "sweep.method uses the curated transfer set, but this ktray has no curate stage"
            )
    started = time.perf_counter()
    log.info(
        "sweep %s: %s; method %s; %s scheduler",
        cfg.name,
        sweeps.describe(params),
        cfg.sweep.method,
        cfg.sweep.scheduler,
    )
    ensure_ray(cfg.ray)
    check_shared_storage(cfg.ray, cfg.out)  # trials run on any node: out must be shared
    shared = prepare_shared(cfg, params)
    grid = _tune(cfg, params, shared)
    rows, histories = trial_rows(cfg, grid, params, sweep_dir(cfg))
    paths, best = write_sweep_results(cfg, rows, params)
    spent = accounting.totals(accounting.gather(sweep_dir(cfg)))
    result = {
        "rows": rows,
        "best": best,
        "outputs": paths,
        "seconds": time.perf_counter() - started,
        **spent,
    }
    manifest.write(
        sweep_dir(cfg),
        {
            "stage": "sweep",
            "name": "",
            "sweep": cfg.name,
            "config_hash": "",
            "outputs": paths,
            "trials": len(rows),
            "finished": sum(r["status"] == "done" for r in rows),
            "best": best,
            "seconds": result["seconds"],
            "flops": spent["flops"],
            "device_seconds": spent["device_seconds"],
        },
        cfg,
    )
    try:
        result["mlflow_run_id"] = log_sweep(cfg, rows, [p.key for p in params], paths, histories)
        result["mlflow_tracking_uri"] = tracking_uri(cfg) if cfg.tracking.mlflow else None
    except Exception as e:  # tracking must not lose a finished sweep's results
        log.warning("MLflow logging failed: %s", e)
    failed = [r for r in rows if r["status"] == "error"]
    if failed and len(failed) == len(rows):
        raise KtrayError(
            f"every trial failed; first error: {failed[0].get('error')} (table: {paths['md']})"
        )
    for r in failed:
        log.warning("sweep: %s failed: %s", r["trial"], r.get("error"))
    return result
