"""Results of a segmentation run: results.json / .md / .png and a picture of test images
with ground truth, teacher and student masks side by side (no ray here).

``results.json`` has ``"task_type": "segmentation"`` and per method ``test_miou``,
``test_pixel_accuracy``, ``per_class_iou`` (and ``distill_test_miou``: the distilled
student's mIoU before finetuning); ``test_accuracy`` is left out (it means classification
accuracy everywhere else). With ``export.speed`` the speed table of ``ktray run`` follows
(the exported dense graphs: logits at the input size).
"""

from __future__ import annotations

import numpy as np

from ktray import storage
from ktray.pipeline import figures, reporting
from ktray.pipeline.replicates import cell, summary
from ktray.pipeline.reporting import SPEED_HEADER, _text_table, describe, speed_rows

HEADER = ["method", "test mIoU", "mIoU before finetune", "pixel acc", "train s", "what it is"]


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, m in results["methods"].items():
        rows.append(
            [
                name,
                cell(m, "test_miou"),  # mean ± sd with seeds > 1
                cell(m, "distill_test_miou"),
                cell(m, "test_pixel_accuracy"),
                f"{m.get('train_seconds', 0):.1f}",
                describe(name),
            ]
        )
    return rows


def format_table(results: dict) -> str:
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    text = table + "\n" + "\n".join(summary(results))
    speed = speed_rows(results)
    if speed:
        text += "\n\nCPU speed (batch 1 latency, batch 32 throughput; same process):\n"
        text += _text_table([SPEED_HEADER] + speed)
    return text


def markdown(results: dict) -> str:
    md = [
        f"# ktray results: {results['task']} (segmentation)",
        "",
        f"{results.get('train_images', '?')} labeled images; test set of "
        f"{results.get('test_images', '?')} images; mIoU over {results['num_classes']} classes "
        "(ignore index left out).",
        "",
    ]
    md += ["| " + " | ".join(r) + " |" for r in [HEADER, ["---"] * len(HEADER)]]
    md += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    md += ["", "![mIoU](results.png)", ""]
    md += [f"- {line}" for line in summary(results)] + [""]
    if results.get("masks_png"):
        md += ["![test masks](masks.png)", ""]
    speed = speed_rows(results)
    if speed:
        md += [
            "## Speed on this machine's CPU",
            "",
            "Latency at batch 1, throughput at batch 32 of the exported graph (logits "
            "upsampled to the input size), PyTorch (eager) and onnxruntime (fp32, static int8) "
            "in the same process; the speed-up is the student's onnxruntime throughput over "
            "the teacher's.",
            "",
        ]
        rows = [SPEED_HEADER, ["---"] * len(SPEED_HEADER)] + speed
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    names = results.get("class_names") or []
    if names:
        md += ["## Per-class IoU", ""]
        methods = list(results["methods"])
        md.append("| class | " + " | ".join(methods) + " |")
        md.append("|---" * (len(methods) + 1) + "|")
        for c, cname in enumerate(names):
            cells = []
            for m in methods:
                v = (results["methods"][m].get("per_class_iou") or [None] * len(names))[c]
                cells.append("-" if v is None else f"{v:.3f}")
            md.append(f"| {cname} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md) + "\n"


def plot(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    vals = [results["methods"][n]["test_miou"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))
    colors = [
        "#888"
        if n in ("teacher", "scratch")
        else ("#1f77b4" if n.startswith("task") else "#ff7f0e")
        for n in names
    ]
    ax.barh(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v + 0.005, i, f"{v:.3f}", va="center")
    ax.set_xlim(0, min(1.0, max(vals) + 0.1))
    ax.invert_yaxis()
    ax.set_xlabel("test mIoU")
    ax.set_title(f"{results['task']}: segmentation")
    fig.tight_layout()
    return figures.png(fig)


def palette(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``uint8 [256, 3]`` colours: class 0 dark grey, others distinct, ignore white."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    pal = np.zeros((256, 3), np.uint8)
    pal[0] = (40, 40, 40)
    for c in range(1, num_classes):
        pal[c] = (np.asarray(cmap((c - 1) % 20)[:3]) * 255).astype(np.uint8)
    pal[ignore_index] = (255, 255, 255)
    return pal


def masks_picture(images: list, columns: dict[str, list[np.ndarray]], pal: np.ndarray) -> bytes:
    """PNG grid: one row per test image: the image, then each column's mask (ground truth,
    teacher, students) coloured by ``pal``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows, cols = len(images), len(names) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for r, img in enumerate(images):
        axes[r][0].imshow(img)
        for c, name in enumerate(names, 1):
            axes[r][c].imshow(pal[columns[name][r]], interpolation="nearest")
        for c in range(cols):
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title((["image"] + names)[c], fontsize=8)
    fig.tight_layout()
    return figures.png(fig, dpi=90)


def write_results(out: str, results: dict) -> dict:
    """Write results.json, results.md and results.png under ``out``; return their URIs."""
    return reporting.write_results(out, results, plot, markdown)


def write_picture(cfg, info: dict, models: dict, n: int = 6) -> str:
    """``OUT/masks.png``: the first ``n`` test images with ground truth, teacher and
    student masks side by side; returns its URI."""
    from ktray.data.segmentation import load_mask
    from ktray.data.sources import load_image_strict
    from ktray.seg_evaluation import predict_masks

    test = storage.read_parquet(info["outputs"]["test"])
    rows = list(range(min(n, len(test))))
    images = [
        np.asarray(load_image_strict(s).convert("RGB")) for s in test["source"].to_pylist()[:n]
    ]
    columns = {"ground truth": [load_mask(m) for m in test["mask"].to_pylist()[:n]]}
    for method, model_dir in models.items():
        columns[method] = predict_masks(model_dir, test, rows)
    uri = storage.join(cfg.out, "masks.png")
    pal = palette(info["num_classes"], cfg.data.ignore_index)
    storage.write_bytes(uri, masks_picture(images, columns, pal))
    return uri
