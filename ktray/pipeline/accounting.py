"""Compute accounting: every stage manifest under an output folder, in one table (no ray here).

``gather(out)`` reads every ``manifest.json`` under ``out`` (the stages of a pipeline run and of
every sweep trial), one row each, with its FLOPs, device-seconds and test accuracy (test mIoU for
segmentation; the report plots that task's metric). A finetuned student's row also gets its
*pretraining compute*: its distillation's FLOPs plus the teacher's FLOPs over the transfer set
(the logits pass), as in the paper's accuracy-against-compute plot (Fig. 4).
``write_report(out)`` writes the table (markdown + Parquet) and that plot atomically under
``out/report/``.

A stage output a sweep trial shares (a symlink to ``sweep/shared``) appears in each trial's rows,
so every trial's pretraining compute is complete, but counts once in the totals. A trial ASHA
stopped mid-stage leaves a ``stopped`` manifest (the steps, images, seconds and estimated FLOPs
it spent in that stage): the totals include it, so they add up to what the sweep spent.
"""

from __future__ import annotations

import os

import pyarrow as pa

from ktray import storage
from ktray.pipeline import figures
from ktray.pipeline.manifest import MANIFEST, path_name
from ktray.pipeline.replicates import split_name, stage_name

SKIP_DIRS = {"ray", "report", "model", "mlruns"}
AGGREGATES = ("pipeline", "sweep")
"""Summary manifests (a run's, a sweep's totals): listed, never added to the totals."""
METRIC_LABELS = {"test_accuracy": "test accuracy", "test_miou": "test mIoU"}
STOPPED = "stopped"
"""The stage name of a sweep trial's partial stage (see the module docstring)."""
COLUMNS = [
    "run",
    "stage",
    "name",
    "params",
    "test_accuracy",
    "test_miou",
    "pretrain_flops",
    "flops",
    "flops_per_image",
    "device_seconds",
    "seconds",
    "transfer_images",
    "shared",
    "path",
]


def _manifest_paths(out: str) -> list[str]:
    if storage.is_remote(out):
        fs, path = storage.fs_and_path(out)
        proto = out.split("://", 1)[0]
        return sorted(
            f"{proto}://{p}"
            for p in fs.find(path)
            if p.endswith("/" + MANIFEST) and not set(p[len(path) :].split("/")[:-1]) & SKIP_DIRS
        )
    found = []
    for root, dirs, files in os.walk(out, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        if MANIFEST in files:
            found.append(os.path.join(root, MANIFEST))
    return sorted(found)


def _run_of(rel_dir: str, stage: str, name: str) -> str:
    parts = [p for p in rel_dir.split("/") if p not in ("", ".")]
    tail = [stage] + ([path_name(name)] if name else [])
    if parts[-len(tail) :] == tail:
        parts = parts[: -len(tail)]
    elif parts:
        parts = parts[:-1]
    return "/".join(parts) or "."


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _params(run_dir: str) -> str:
    uri = storage.join(run_dir, "trial.json")
    if not storage.exists(uri):
        return ""
    from ktray.pipeline.sweeps import display

    params = storage.read_json(uri).get("params", {})
    return " ".join(f"{k}={display(v)}" for k, v in params.items())


def gather(out: str) -> list[dict]:
    """One row per stage manifest under ``out`` (see COLUMNS)."""
    out = str(out).rstrip("/")
    rows, manifests = [], {}
    for uri in _manifest_paths(out):
        try:
            m = storage.read_json(uri)
        except Exception:
            continue
        if not isinstance(m, dict) or "stage" not in m:
            continue
        d = uri[: -len(MANIFEST) - 1]
        rel = d[len(out) :].strip("/") or "."
        run = _run_of(rel, str(m["stage"]), str(m.get("name") or ""))
        shared = not storage.is_remote(d) and os.path.realpath(d) != os.path.abspath(d)
        manifests[(run, m["stage"], m.get("name") or "")] = m
        rows.append(
            {
                "run": run,
                "stage": str(m["stage"]),
                "name": str(m.get("name") or ""),
                "params": "",
                "test_accuracy": _number(m.get("test_accuracy")),
                "test_miou": _number(m.get("test_miou")),
                "pretrain_flops": None,
                "flops": 0.0 if m.get("adopted") else _number(m.get("flops")),
                "flops_per_image": _number(m.get("flops_per_image")),
                "device_seconds": _number(m.get("device_seconds")),
                "seconds": _number(m.get("seconds", m.get("train_seconds"))),
                "transfer_images": None,
                "shared": shared,
                "path": d,
            }
        )
    params = {}
    for row in rows:
        run_dir = out if row["run"] == "." else storage.join(out, row["run"])
        if row["run"] not in params:
            params[row["run"]] = _params(run_dir)
        row["params"] = params[row["run"]]
        if row["stage"] != "finetune":
            continue
        base, seed = split_name(row["name"])  # a replicate (seeds=N): method~seedS
        method = _method(base)
        if method is None:
            continue
        # scratch and init@WEIGHTS: no pretraining here (ImageNet's is not counted)
        row["pretrain_flops"] = 0.0
        if method.distills:
            pre = manifests.get((row["run"], "distill", stage_name(method.distill_name, seed)), {})
            logits = (
                manifests.get((row["run"], "logits", method.transfer), {})
                if pre.get("uses_logits", True)
                else {}
            )  # online: no logits pass
            row["pretrain_flops"] = (_number(pre.get("flops")) or 0.0) + (
                _number(logits.get("flops")) or _number(logits.get("attributed_flops")) or 0.0
            )
            row["transfer_images"] = _number(logits.get("images"))
    return rows


def _method(name: str):
    """The parsed method of a finetune output's name; None for a name ktray cannot parse."""
    from ktray.config import methods
    from ktray.errors import KtrayError

    try:
        return methods.parse(name or "scratch")
    except KtrayError:
        return None


def totals(rows: list[dict]) -> dict:
    """FLOPs and device-seconds actually spent: every stage manifest once (a trial's view of a
    shared output and the summary manifests are not added again). ``manifests`` counts every
    row, ``stages`` the stage runs added up, ``shared_views`` and ``summaries`` the others."""
    own = [r for r in rows if not r["shared"] and r["stage"] not in AGGREGATES]
    return {
        "flops": sum(r["flops"] or 0.0 for r in own),
        "device_seconds": sum(r["device_seconds"] or 0.0 for r in own),
        "stages": len(own),
        "manifests": len(rows),
        "shared_views": sum(1 for r in rows if r["shared"] and r["stage"] not in AGGREGATES),
        "summaries": sum(1 for r in rows if r["stage"] in AGGREGATES),
        "stopped": sum(1 for r in own if r["stage"] == STOPPED),
    }


def describe_totals(t: dict) -> str:
    """``7 manifests: 6 stage runs added up (...) + 1 summary`` — what each count counts."""
    parts = [f"{t['stages']} stage runs added up"]
    if t.get("stopped"):
        parts[0] += f" ({t['stopped']} of them stopped early by the scheduler)"
    if t.get("shared_views"):
        parts.append(f"{t['shared_views']} trial views of shared outputs (counted once)")
    if t.get("summaries"):
        n = t["summaries"]
        parts.append(f"{n} run/sweep summar{'y' if n == 1 else 'ies'} (not added)")
    return f"{t['manifests']} manifests: " + " + ".join(parts)


def fmt(value, column: str = "") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if "flops" in column:
            return f"{value:.3g}"
        if "accuracy" in column or "miou" in column:
            return f"{value:.4f}"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), c).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def to_arrow(rows: list[dict], columns: list[str]) -> pa.Table:
    """Rows as an Arrow table; list/dict values become strings."""

    def plain(v):
        return str(v) if isinstance(v, (list, tuple, dict)) else v

    return pa.table({c: [plain(r.get(c)) for r in rows] for c in columns})


def plot_accuracy(
    points: list[dict],
    x: str,
    *,
    group: str = "",
    label: str = "",
    title: str = "",
    xlabel: str = "",
    hlines: dict | None = None,
    metric: str = "test_accuracy",
) -> bytes:
    """PNG of ``metric`` (``test_accuracy``, or ``test_miou`` for segmentation) against ``x``:
    one line per ``group`` value, points annotated with ``label``; ``hlines`` = {name: value}
    reference lines. Log x-axis when ``x`` spans more than a factor of 20."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = [p for p in points if p.get(x) is not None and p.get(metric) is not None]
    groups: dict = {}
    for p in pts:
        groups.setdefault(p.get(group, "") if group else "", []).append(p)
    for name, gp in groups.items():
        gp = sorted(gp, key=lambda p: p[x])
        ax.plot([p[x] for p in gp], [p[metric] for p in gp], "o-", label=name or None)
    if label:
        for p, dy in zip(*_label_offsets([p for p in pts if p.get(label)], x, metric)):
            ax.annotate(
                str(p[label]),
                (p[x], p[metric]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4 + dy),
            )
    xs = [p[x] for p in pts]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    for i, (name, value) in enumerate((hlines or {}).items()):
        ax.axhline(
            value, ls=("--", ":", "-.")[i % 3], color="gray", lw=1, label=f"{name} ({value:.3f})"
        )
    if not pts:
        ax.text(0.5, 0.5, "no finished points", ha="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figures.png(fig)


def _label_offsets(
    points: list[dict], x: str, metric: str = "test_accuracy"
) -> tuple[list[dict], list[int]]:
    """Vertical label offsets (points) so labels of points at (nearly) the same place do not
    overprint: points at one x are stacked in accuracy order, each label 9 points above the
    previous one when their accuracies are within 2% of the plot's accuracy range."""
    if not points:
        return [], []
    ys = [p[metric] for p in points]
    close = 0.02 * max(max(ys) - min(ys), 0.05)
    xs = [p[x] for p in points]
    xspan = (max(xs) - min(xs)) or 1.0
    order = sorted(points, key=lambda p: (p[x], p[metric]))
    offsets, prev = [], None
    for p in order:
        same = (
            prev is not None
            and abs(p[x] - prev[0][x]) <= 0.01 * xspan
            and abs(p[metric] - prev[0][metric]) <= close
        )
        offsets.append(prev[1] + 9 if same else 0)
        prev = (p, offsets[-1])
    return order, offsets


def report_metric(rows: list[dict]) -> str:
    """The metric a compute report plots: ``test_miou`` when the rows are a segmentation
    run's (some have an mIoU, none an accuracy), else ``test_accuracy``."""
    if any(r.get("test_miou") is not None for r in rows) and not any(
        r.get("test_accuracy") is not None for r in rows
    ):
        return "test_miou"
    return "test_accuracy"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_report(out: str) -> dict:
    """Gather every manifest under ``out``; write ``out/report/{compute.md, compute.parquet,
    accuracy_vs_compute.png}`` atomically; return ``{"rows", "totals", "outputs"}``."""
    from ktray.errors import KtrayError

    if not storage.exists(out):
        raise KtrayError(f"output folder not found: {out}")
    rows = gather(out)
    if not rows:
        raise KtrayError(f"no stage manifests under {out}: run a ktray stage, run or sweep first")
    t = totals(rows)
    metric = report_metric(rows)
    pretrained = [
        dict(r, method=r["name"])
        for r in rows
        if r["stage"] == "finetune" and (r["pretrain_flops"] or 0) > 0
    ]
    hlines = {}
    inits = sorted(
        {r["name"] for r in rows if r["stage"] == "finetune" and r["name"].startswith("init@")}
    )
    references = [("scratch", "finetune", "scratch"), ("teacher", "teacher", "")]
    for name, stage, method in references + [(n, "finetune", n) for n in inits]:
        acc = _mean([r[metric] for r in rows if r["stage"] == stage and r["name"] == method])
        if acc is not None:
            hlines[name] = acc
    png = plot_accuracy(
        pretrained,
        "pretrain_flops",
        group="method",
        label="params",
        title=f"{METRIC_LABELS[metric]} against pretraining compute",
        xlabel="pretraining FLOPs (distillation + teacher over the transfer set)",
        hlines=hlines,
        metric=metric,
    )
    report = storage.join(out, "report")
    paths = {
        "md": storage.join(report, "compute.md"),
        "parquet": storage.join(report, "compute.parquet"),
        "png": storage.join(report, "accuracy_vs_compute.png"),
    }
    storage.write_bytes(paths["png"], png)
    storage.write_parquet(paths["parquet"], to_arrow(rows, COLUMNS))
    md = [
        f"# Compute report: {out}",
        "",
        f"{describe_totals(t)}; {t['flops']:.3g} FLOPs and {t['device_seconds']:.1f} "
        "device-seconds spent (shared outputs counted once; adopted checkpoints cost 0; "
        "`stopped`: the part of a stage a trial ran before the scheduler stopped it, FLOPs "
        "estimated from its images).",
        "",
        "pretrain_flops (finetuned students): distillation + the teacher's pass over the "
        "transfer set. `shared`: a sweep trial's view of an output in sweep/shared.",
        "",
        markdown_table(rows, [c for c in COLUMNS if c != "path" and c != _other(metric)]),
        "",
        f"![{METRIC_LABELS[metric]} against pretraining compute](accuracy_vs_compute.png)",
        "",
    ]
    storage.write_text(paths["md"], "\n".join(md))
    return {"rows": rows, "totals": t, "outputs": paths, "metric": metric}


def _other(metric: str) -> str:
    """The metric column a report leaves out of its markdown (always empty there)."""
    return "test_accuracy" if metric == "test_miou" else "test_miou"
