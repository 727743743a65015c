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

Results: ``OUT/sweep/results.{md,parquet}``, accuracy against transfer-set size, pretraining
compute and the swept values (PNG), an MLflow parent run with one child run per trial and the
sweep manifest (totals of FLOPs and device-seconds).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ktray import storage
from ktray.config import Config, apply_overrides, to_dict
from ktray.errors import KtrayError
from ktray.pipeline import accounting, manifest, sweeps
from ktray.pipeline.tasks import prepare_task
from ktray.pipeline.tracking import log_sweep, tracking_uri
from ktray.pipeline.validate import parse_method
from ktray.stages.common import ensure_ray, start_trial, storage_path, trial_steps
from ktray.stages.nodes import check_shared_storage

log = logging.getLogger("ktray")
RESULT_KEYS = (
    "test_accuracy",
    "distill_test_accuracy",
    "pretrain_flops",
    "finetune_flops",
    "transfer_images",
    "train_seconds",
    "wall_seconds",
)


def sweep_dir(cfg: Config) -> str:
    return storage.join(cfg.out, "sweep")


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


def _prepare_shared(cfg: Config, params: list[sweeps.Param]) -> dict:
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
    objective, transfer = parse_method(cfg.sweep.method)
    if (
        [p.key for p in params] != ["data.unlabeled_limit"]
        or transfer != "in_domain"
        or objective in ("scratch", "teacher")
        or not rules["teacher"]
    ):
        return None
    values = [int(v) for v in params[0].values]
    return 0 if 0 in values else max(values)


# What a trial needs of a shared stage folder on an object store (no symlinks there): the
# manifest (its outputs point into the shared folder, so parts are read from there) and the
# small tables a trial reads by path.
POINTER_FILES = ("manifest.json", "config.yaml", "transfer_set.parquet")


def _link(src: str, dst: str) -> None:
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
            "test_accuracy": r.get("test_accuracy"),
            "train_seconds": r.get("train_seconds"),
            "model": r["outputs"]["model"],
        }
    entry, model = run_stage._student_entry(cfg, method)
    return dict(entry, model=model)


def _trial(config: dict, base: dict, shared: dict, keys: list, method: str, out_dir: str):
    """One trial, in its own Ray process: the method on base + this trial's values."""
    import ray.tune

    _trial_logging()
    start_trial()
    started = time.perf_counter()
    values = {k: config[k] for k in keys}
    name = sweeps.trial_name(values)
    trial_out = storage.join(out_dir, name)
    extra = {"out": trial_out, "tracking.mlflow": False}
    if shared["teacher"]:
        extra["teacher.checkpoint"] = shared["teacher"]
    cfg = apply_overrides(apply_overrides(base, values), extra)
    for rel in shared["links"]:
        _link(storage.join(shared["out"], rel), storage.join(trial_out, rel))
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


def _tune(cfg: Config, params: list[sweeps.Param], shared: dict):
    from ray import tune

    s = cfg.sweep
    trainable = tune.with_parameters(
        _trial,
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


def _rows(grid, params: list[sweeps.Param], out_dir: str) -> tuple[list, dict]:
    rows, histories = [], {}
    for r in grid:
        values = {p.key: r.config.get(p.key) for p in params}
        name = sweeps.trial_name(values)
        row = {"trial": name, "status": "done", **values}
        tj = storage.join(out_dir, name, "trial.json")
        if r.error is None and (r.metrics or {}).get("ktray_done") and storage.exists(tj):
            done = storage.read_json(tj)
            row.update({k: done.get(k) for k in RESULT_KEYS})
        elif r.error is not None:
            row["status"] = "error"
            row["error"] = (str(r.error).strip().splitlines() or ["?"])[-1][:300]
        else:
            row["status"] = "stopped"  # by the ASHA scheduler
        row["trial_dir"] = storage.join(out_dir, name)
        rows.append(row)
        try:
            df = r.metrics_dataframe
            histories[name] = df.to_dict("records") if df is not None else []
        except Exception:
            histories[name] = []
    return rows, histories


def _param_points(rows: list[dict], params: list[sweeps.Param]) -> tuple[list, str]:
    """Points for the accuracy-against-values plot: x = the first key taking several values,
    one line per combination of the others."""
    varied = [p for p in params if len({sweeps.display(r.get(p.key)) for r in rows}) > 1]
    params = varied + [p for p in params if p not in varied]
    key = params[0].key
    values = [r.get(key) for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = {}
    for v in values:
        order.setdefault(sweeps.display(v), len(order))
    points = []
    for r in rows:
        p = dict(
            r,
            label=sweeps.display(r.get(key)),
            group=" ".join(f"{q.key}={sweeps.display(r.get(q.key))}" for q in params[1:]),
        )
        p["x"] = r.get(key) if numeric else order[p["label"]]
        points.append(p)
    return points, key if numeric else f"{key} (values as labelled)"


def write_sweep_results(
    cfg: Config, rows: list[dict], params: list[sweeps.Param]
) -> tuple[dict, dict | None]:
    """results.{md,parquet} and the plots under OUT/sweep/ (atomic writes); returns their
    URIs and the best finished row."""
    d = sweep_dir(cfg)
    keys = [p.key for p in params]
    label = [dict(r, label=" ".join(f"{k}={sweeps.display(r.get(k))}" for k in keys)) for r in rows]
    paths = {
        "md": storage.join(d, "results.md"),
        "parquet": storage.join(d, "results.parquet"),
        "transfer_png": storage.join(d, "accuracy_vs_transfer_size.png"),
        "compute_png": storage.join(d, "accuracy_vs_compute.png"),
        "params_png": storage.join(d, "accuracy_vs_params.png"),
    }
    title = f"{cfg.name}: {cfg.sweep.method}"
    storage.write_bytes(
        paths["transfer_png"],
        accounting.plot_accuracy(
            label, "transfer_images", label="label", title=title, xlabel="transfer-set images"
        ),
    )
    storage.write_bytes(
        paths["compute_png"],
        accounting.plot_accuracy(
            label,
            "pretrain_flops",
            label="label",
            title=title,
            xlabel="pretraining FLOPs (distillation + teacher over the transfer set)",
        ),
    )
    points, xlabel = _param_points(rows, params)
    storage.write_bytes(
        paths["params_png"],
        accounting.plot_accuracy(
            points, "x", group="group", label="label", title=title, xlabel=xlabel
        ),
    )
    columns = ["trial", "status", *keys, *RESULT_KEYS, "trial_dir", "error"]
    storage.write_parquet(paths["parquet"], accounting.to_arrow(rows, columns))
    s = cfg.sweep
    done = [r for r in rows if r.get(s.metric) is not None]
    best = (max if s.mode == "max" else min)(done, key=lambda r: r[s.metric]) if done else None
    md = [
        f"# ktray sweep: {cfg.name}",
        "",
        f"Method `{s.method}`; swept: {sweeps.describe(params)}; scheduler {s.scheduler}; "
        f"{len(done)} of {len(rows)} trials finished.",
        "",
    ]
    if best:
        md += [
            f"Best by {s.metric} ({s.mode}): **{best['trial']}** "
            f"({', '.join(f'{k}={sweeps.display(best.get(k))}' for k in keys)}): "
            f"{accounting.fmt(best[s.metric], s.metric)}",
            "",
        ]
    md += [accounting.markdown_table(rows, [c for c in columns if c != "trial_dir"]), ""]
    md += [
        f"![{k}]({os.path.basename(paths[k])})"
        for k in ("transfer_png", "compute_png", "params_png")
    ]
    storage.write_text(paths["md"], "\n".join(md) + "\n")
    return paths, best


def run(cfg: Config) -> dict:
    """Run the sweep of ``cfg.sweep``; return ``{"rows", "best", "outputs", ...}``."""
    params = sweeps.parse(cfg)  # every key and value checked before Ray starts
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
    shared = _prepare_shared(cfg, params)
    grid = _tune(cfg, params, shared)
    rows, histories = _rows(grid, params, sweep_dir(cfg))
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
