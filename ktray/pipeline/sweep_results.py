"""The sweep's results under ``OUT/sweep/``: ``results.{md,parquet}`` and the plots of accuracy
against the swept values, transfer-set size and pretraining compute (atomic writes)."""

from __future__ import annotations

import os

from ktray import storage
from ktray.config import Config
from ktray.pipeline import accounting, sweeps
from ktray.pipeline.sweep_trials import RESULT_KEYS, sweep_dir


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
    metric = sweeps.task_metric(cfg)  # test_accuracy, or test_miou (segmentation)
    finished = [r for r in label if r.get(metric) is not None]
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
                accounting.plot_accuracy(
                    label, column, label="label", title=title, xlabel=xlabel, metric=metric
                ),
            )
        elif seen:
            value = accounting.fmt(next(iter(seen)), column)
            notes.append(f"every finished trial: {column} = {value} (no plot against it)")
    points, xlabel = _param_points(rows, params)
    paths["params_png"] = storage.join(d, "accuracy_vs_params.png")
    storage.write_bytes(
        paths["params_png"],
        accounting.plot_accuracy(
            points, "x", group="group", label="label", title=title, xlabel=xlabel, metric=metric
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
