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
import re
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


def _rows(cfg: Config, grid, params: list[sweeps.Param], out_dir: str) -> tuple[list, dict]:
    rows, histories = [], {}
    for r in grid:
        values = {p.key: r.config.get(p.key) for p in params}
        name = sweeps.trial_name(values)
        row = {"trial": name, "status": "done", **values}
        try:
            df = r.metrics_dataframe
            histories[name] = df.to_dict("records") if df is not None else []
        except Exception:
            histories[name] = []
        tj = storage.join(out_dir, name, "trial.json")
        if r.error is None and (r.metrics or {}).get("ktray_done") and storage.exists(tj):
            done = storage.read_json(tj)
            row.update({k: done.get(k) for k in RESULT_KEYS})
        elif r.error is not None:
            row["status"] = "error"
            row["error"] = (str(r.error).strip().splitlines() or ["?"])[-1][:300]
        else:
            row["status"] = "stopped"  # by the ASHA scheduler
            row["stopped_in"] = _record_stopped(
                cfg, values, storage.join(out_dir, name), histories[name]
            )
        row["trial_dir"] = storage.join(out_dir, name)
        rows.append(row)
    _add_trial_compute(rows, out_dir)
    return rows, histories


def _record_stopped(cfg: Config, values: dict, trial_dir: str, history: list[dict]) -> str:
    """Write ``TRIAL/stopped/manifest.json`` for the stage a stopped trial was in, from its
    last report (steps, images, seconds) with FLOPs estimated as 3x the student's forward
    FLOPs per trained image (the teacher stage's: not estimated); returns ``stage[name] at
    step S``. The stages it finished have their own manifests already."""
    reports = [h for h in history if h.get("stage") and h.get("images") is not None]
    if not reports:
        return ""
    last = reports[-1]
    label = str(last["stage"])  # the Ray Train run's name: STAGE-NAME[-HASH8]
    kind, _, name = label.partition("-")
    name = "" if re.fullmatch(r"[0-9a-f]{8}", name) else re.sub(r"-[0-9a-f]{8}$", "", name)
    done = manifest.stage_dir(trial_dir, kind, name)
    if storage.exists(storage.join(done, manifest.MANIFEST)):
        return ""  # it finished that stage: its own manifest counts it
    images, seconds = float(last["images"]), float(last.get("seconds") or 0.0)
    flops, fpi = None, None
    trial_cfg = apply_overrides(apply_overrides(cfg, values), {"out": trial_dir})
    if kind in ("distill", "finetune"):
        try:
            fpi = _student_forward_flops(trial_cfg, name, trial_dir)
            flops = 3.0 * fpi * images
        except Exception as e:  # an estimate: never lose the sweep's results over it
            log.warning("sweep: no FLOPs estimate for stopped %s: %s", label, e)
    step = int(last.get("step") or 0)
    stage_name = f"{kind}[{name}]" if name else kind
    manifest.write(
        storage.join(trial_dir, accounting.STOPPED),
        {
            "stage": accounting.STOPPED,
            "name": f"{stage_name} at step {step}",
            "config_hash": "",
            "stopped_stage": kind,
            "stopped_name": name,
            "steps": step,
            "images_seen": images,
            "seconds": seconds,
            "device_seconds": seconds * max(1, cfg.ray.num_workers),
            "flops": flops,
            "flops_per_image": fpi,
            "flops_estimated": flops is not None,
        },
        trial_cfg,
    )
    return f"{stage_name} at step {step}"


def _student_forward_flops(cfg: Config, method: str, trial_dir: str) -> float:
    """The forward FLOPs per image of the trial's student (as the training stages count)."""
    from ktray.models import create_student
    from ktray.models.flops import count_flops

    data = storage.join(trial_dir, "data", manifest.MANIFEST)
    num_classes = int(storage.read_json(data)["num_classes"]) if storage.exists(data) else 10
    s = cfg.student
    model = create_student(s.arch, num_classes, img_size=s.img_size)
    return float(count_flops(model, s.img_size))


def _add_trial_compute(rows: list[dict], out_dir: str) -> None:
    """Each row's own ``flops`` / ``device_seconds``: the manifests in its trial folder that
    are not views of ``sweep/shared`` (finished stages + a stopped one)."""
    gathered = accounting.gather(out_dir)
    for row in rows:
        run = os.path.basename(row["trial_dir"].rstrip("/"))
        own = [
            g
            for g in gathered
            if g["run"] == run and not g["shared"] and g["stage"] not in accounting.AGGREGATES
        ]
        row["flops"] = sum(g["flops"] or 0.0 for g in own)
        row["device_seconds"] = sum(g["device_seconds"] or 0.0 for g in own)


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


def _compute_line(d: str, rows: list[dict]) -> str:
    """The sweep's compute, as a sum one can check against the table: every trial's own
    stages (the ``flops`` / ``device_seconds`` columns, stopped trials included) plus the
    outputs computed once under ``sweep/shared``."""
    gathered = accounting.gather(d)
    shared = [
        g
        for g in gathered
        if g["run"] == "shared" and not g["shared"] and g["stage"] not in accounting.AGGREGATES
    ]
    t = accounting.totals(gathered)
    trial_flops = sum(r.get("flops") or 0.0 for r in rows)
    trial_secs = sum(r.get("device_seconds") or 0.0 for r in rows)
    shared_flops = sum(g["flops"] or 0.0 for g in shared)
    shared_secs = sum(g["device_seconds"] or 0.0 for g in shared)
    return (
        f"Compute: trials {trial_flops:.4g} FLOPs / {trial_secs:.1f} device-s (the flops and "
        f"device_seconds columns, stopped trials included) + shared outputs "
        f"({', '.join(sorted({g['stage'] for g in shared})) or 'none'}) {shared_flops:.4g} "
        f"FLOPs / {shared_secs:.1f} device-s = {t['flops']:.4g} FLOPs / "
        f"{t['device_seconds']:.1f} device-s ({accounting.describe_totals(t)})."
    )


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
    }
    title = f"{cfg.name}: {cfg.sweep.method}"
    finished = [r for r in label if r.get("test_accuracy") is not None]
    notes = []
    # a plot against a quantity only when the finished trials differ in it (a temperature
    # sweep spends the same compute on one transfer set: one x for every point)
    for key, column, xlabel in (
        ("transfer_png", "transfer_images", "transfer-set images"),
        (
            "compute_png",
            "pretrain_flops",
            "pretraining FLOPs (distillation + teacher over the transfer set)",
        ),
    ):
        seen = {r.get(column) for r in finished if r.get(column) is not None}
        if len(seen) > 1:
            name = (
                "accuracy_vs_transfer_size.png"
                if key == "transfer_png"
                else ("accuracy_vs_compute.png")
            )
            paths[key] = storage.join(d, name)
            storage.write_bytes(
                paths[key],
                accounting.plot_accuracy(label, column, label="label", title=title, xlabel=xlabel),
            )
        elif seen:
            value = accounting.fmt(next(iter(seen)), column)
            notes.append(f"every finished trial: {column} = {value} (no plot against it)")
    points, xlabel = _param_points(rows, params)
    paths["params_png"] = storage.join(d, "accuracy_vs_params.png")
    storage.write_bytes(
        paths["params_png"],
        accounting.plot_accuracy(
            points, "x", group="group", label="label", title=title, xlabel=xlabel
        ),
    )
    columns = [
        "trial",
        "status",
        *keys,
        *RESULT_KEYS,
        "flops",
        "device_seconds",
        "stopped_in",
        "trial_dir",
        "error",
    ]
    storage.write_parquet(paths["parquet"], accounting.to_arrow(rows, columns))
    s = cfg.sweep
    done = [r for r in rows if r.get(s.metric) is not None]
    best = (max if s.mode == "max" else min)(done, key=lambda r: r[s.metric]) if done else None
    md = [
        f"# ktray sweep: {cfg.name}",
        "",
        f"Method `{s.method}`; swept: {sweeps.describe(params)}; scheduler {s.scheduler}; "
        f"{len(done)} of {len(rows)} trials finished"
        + (
            f", {sum(r['status'] == 'stopped' for r in rows)} stopped by the scheduler"
            if any(r["status"] == "stopped" for r in rows)
            else ""
        )
        + ".",
        "",
    ]
    if best:
        md += [
            f"Best by {s.metric} ({s.mode}): **{best['trial']}** "
            f"({', '.join(f'{k}={sweeps.display(best.get(k))}' for k in keys)}): "
            f"{accounting.fmt(best[s.metric], s.metric)}",
            "",
        ]
    md += [_compute_line(d, rows), ""]
    md += [accounting.markdown_table(rows, [c for c in columns if c != "trial_dir"]), ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += [
        f"![{k}]({os.path.basename(paths[k])})"
        for k in ("transfer_png", "compute_png", "params_png")
        if k in paths
    ]
    storage.write_text(paths["md"], "\n".join(md) + "\n")
    return paths, best


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
    shared = _prepare_shared(cfg, params)
    grid = _tune(cfg, params, shared)
    rows, histories = _rows(cfg, grid, params, sweep_dir(cfg))
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
