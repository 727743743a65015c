"""Results of a pipeline run: results.json, a markdown report and a PNG plot (no ray here)."""

from __future__ import annotations

from ktray import storage
from ktray.config import methods as methods_mod
from ktray.errors import KtrayError
from ktray.pipeline import figures, replicates


def describe(method: str) -> str:
    """What ``method`` is, in words (an unknown name, e.g. from an older run: itself)."""
    try:
        return methods_mod.describe(method)
    except KtrayError:
        return method


def labeled_text(results: dict) -> str:
    """How many labeled images the students saw, from the counts actually used."""
    n, per = results.get("train_images"), results.get("labels_per_class")
    classes = results.get("num_classes")
    if per:
        total = f" ({n} in all)" if n is not None else ""
        return f"{per} labeled images per class{total}"
    if n is None:
        return "all labeled training images (data.labels_per_class=0)"
    return f"all {n} labeled training images ({classes} classes; data.labels_per_class=0)"


def short_labeled(results: dict) -> str:
    n, per = results.get("train_images"), results.get("labels_per_class")
    if per:
        return f"{per} labels/class"
    return f"{n} labeled images" if n is not None else "all labels"


def policy_text(results: dict) -> str:
    """The finetuning every student got, in one sentence (empty when not recorded)."""
    p = results.get("finetune_policy")
    if not p:
        return ""
    text = (
        f"Finetuning, every student method: {p['steps']} steps, batch {p['batch_size']}, "
        f"AdamW (weight decay {p['weight_decay']:g}), {p['warmup_steps']} warmup steps then "
        f"cosine; lr {p['lr']:g} from pretrained weights (distilled, ImageNet, checkpoint), "
        f"{p['scratch_lr']:g} from random init (`scratch`)"
    )
    if p["scratch_steps"] != p["steps"]:
        text += f"; `scratch` trains {p['scratch_steps']} steps (finetune.scratch_steps)"
    if p.get("select"):
        text += f"; weights kept: {p['select']}"
    return text + "."


def budget_text(results: dict) -> str:
    """The labeled budget, training + validation images per class (empty without validation)."""
    b = results.get("labeled_budget") or {}
    if not b.get("val_per_class"):
        return ""
    train = b["train_per_class"] if b.get("train_per_class") is not None else "all"
    where = (
        "carved out of the labels (data.val_from=labels)"
        if b.get("val_from") == "labels"
        else "drawn beyond the labels (data.val_from=extra: a larger budget)"
    )
    total = b.get("total_per_class")
    total = f"{total} labeled images per class: " if total else "Labeled images per class: "
    return f"{total}{train} to train + {b['val_per_class']} to validate, {where}."


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, m in results["methods"].items():
        rows.append(
            [
                name,
                replicates.cell(m, "test_accuracy"),  # mean ± sd with seeds > 1
                replicates.cell(m, "distill_test_accuracy"),
                f"{m.get('train_seconds', 0):.1f}",
                f"{m['pretrain_flops'] / 1e12:.2f}" if m.get("pretrain_flops") else "-",
                describe(name),
            ]
        )
    return rows


HEADER = ["method", "test acc", "acc before finetune", "train s", "pretrain TFLOPs", "what it is"]


SPEED_HEADER = [
    "method",
    "model",
    "params M",
    "GFLOPs",
    "MB",
    "PyTorch ms",
    "ORT ms",
    "ORT int8 ms",
    "PyTorch img/s",
    "ORT img/s",
    "ORT int8 img/s",
    "speed-up (ORT img/s)",
]
BACKENDS = ("pytorch", "onnx", "int8")


def speed_rows(results: dict) -> list[list[str]]:
    """The speed table (``results["speed"]``, from ``ktray run``): one row per method;
    latency at batch 1, throughput at batch 32; speed-up over the teacher, same backend."""
    rows = []
    for name, r in (results.get("speed") or {}).items():
        sp = r.get("speed") or {}

        def cell(backend, key, fmt, sp=sp):
            return fmt.format(sp[backend][key]) if backend in sp else "-"

        up = (r.get("speedup") or {}).get("onnx")
        rows.append(
            [
                name,
                f"{r['arch']} @{r['img_size']}",
                f"{r['params'] / 1e6:.2f}",
                f"{r['gflops']:.3f}",
                f"{r['mb']:.1f}",
                *[cell(b, "latency_ms", "{:.2f}") for b in BACKENDS],
                *[cell(b, "throughput", "{:.0f}") for b in BACKENDS],
                f"{up['throughput']:.1f}x" if up else "-",
            ]
        )
    return rows


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header(results: dict) -> list[str]:
    """The results table's header; with seeds > 1 it says the cells are mean ± sd."""
    n = max((m.get("n_seeds", 1) for m in results["methods"].values()), default=1)
    if n < 2:
        return HEADER
    return [HEADER[0], f"test acc (mean ± sd, {n} seeds)"] + HEADER[2:]


def format_table(results: dict) -> str:
    text = _text_table([header(results)] + table_rows(results))
    if policy_text(results):
        text += "\n" + policy_text(results).replace("`", "")
    text += "\n" + "\n".join(replicates.summary(results))
    speed = speed_rows(results)
    if speed:
        text += "\n\nCPU speed (batch 1 latency, batch 32 throughput; same process):\n"
        text += _text_table([SPEED_HEADER] + speed)
    return text


def markdown(results: dict) -> str:
    rows = [header(results), ["---"] * len(HEADER)] + table_rows(results)
    md = [
        f"# ktray results: {results['task']}",
        "",
        f"{labeled_text(results)}; test set of {results.get('test_images', '?')} images.",
        "",
    ]
    if budget_text(results):
        md += [budget_text(results), ""]
    if policy_text(results):
        md += [policy_text(results), ""]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "![accuracy](results.png)", ""]
    md += [f"- {line}" for line in replicates.summary(results)] + [""]
    speed = speed_rows(results)
    if speed:
        md += [
            "## Speed on this machine's CPU",
            "",
            "Latency at batch 1, throughput at batch 32, PyTorch (eager) and onnxruntime "
            "(fp32, static int8) measured in the same process; the speed-up is the "
            "student's onnxruntime throughput over the teacher's.",
            "",
        ]
        md += [
            "| " + " | ".join(r) + " |" for r in [SPEED_HEADER, ["---"] * len(SPEED_HEADER)] + speed
        ]
        md.append("")
    for key, value in results.get("notes", {}).items():
        md.append(f"- **{key}**: {value}")
    return "\n".join(md) + "\n"


def plot(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    acc = [results["methods"][n]["test_accuracy"] for n in names]
    sds = [results["methods"][n].get("test_accuracy_std") or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))

    def color(n: str) -> str:
        if n in ("teacher", "scratch"):
            return "#888"
        if n.startswith("init@"):
            return "#2ca02c"
        return "#1f77b4" if n.startswith("task") else "#ff7f0e"

    colors = [color(n) for n in names]
    # error bars: one sample standard deviation over the seeds (none for a single run)
    ax.barh(names, acc, color=colors, xerr=sds if any(sds) else None, capsize=4)
    for i, (a, sd) in enumerate(zip(acc, sds)):
        ax.text(a + sd + 0.005, i, f"{a:.3f}" + (f" ± {sd:.3f}" if sd else ""), va="center")
    lo = max(0.0, min(acc) - 0.1)
    ax.set_xlim(lo, min(1.0, max(a + sd for a, sd in zip(acc, sds)) + (0.12 if any(sds) else 0.08)))
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy")
    kind = results.get("data_kind")
    task = results["task"] + (f" ({kind} data)" if kind and kind != results["task"] else "")
    ax.set_title(f"{task}: {short_labeled(results)}")
    fig.tight_layout()
    return figures.png(fig)


def write_results(out: str, results: dict, plot_fn=None, markdown_fn=None) -> dict:
    """Write results.json, results.md and results.png under ``out`` (``plot_fn`` /
    ``markdown_fn``: another task type's figure and text); return their URIs."""
    paths = {k: storage.join(out, f"results.{k}") for k in ("json", "md", "png")}
    storage.write_bytes(paths["png"], (plot_fn or plot)(results))
    storage.write_text(paths["md"], (markdown_fn or markdown)(results))
    storage.write_json(paths["json"], results)
    return paths
