"""The curation report (no ray here): a PNG grid of queries beside the images they retrieved,
a histogram of the selected images' scores, and a markdown summary, written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ktray import storage
from ktray.data import columns as C
from ktray.data.sources import load_images
from ktray.pipeline import figures

THUMB = 64
LEAK_ROWS = 8


def _png(fig) -> bytes:
    return figures.png(fig, dpi=100)


def _thumb(img) -> np.ndarray:
    if img is None:
        return np.full((THUMB, THUMB, 3), 128, np.uint8)  # grey: unreadable
    return np.asarray(img.convert("RGB").resize((THUMB, THUMB)))


def grid_png(
    queries: pa.Table, transfer: pa.Table, n_queries: int = 6, per_query: int = 8
) -> bytes:
    """The first ``n_queries`` queries (in query-table order) that retrieved anything, each in
    a row beside its ``per_query`` best-ranked images, captioned with rank and score.

    Args:
        queries: ``image_id, source`` of the query images.
        transfer: the transfer set (``source, query_id, rank, score``).
    """
    plt = figures.pyplot()
    by_query: dict[str, list[tuple[int, str, float]]] = {}
    for q, r, s, src in zip(
        transfer[C.QUERY_ID].to_pylist(),
        transfer[C.RANK].to_pylist(),
        transfer[C.SCORE].to_pylist(),
        transfer[C.SOURCE].to_pylist(),
    ):
        by_query.setdefault(q, []).append((r, src, s))
    source_of = dict(zip(queries[C.IMAGE_ID].to_pylist(), queries[C.SOURCE].to_pylist()))
    shown = [q for q in queries[C.IMAGE_ID].to_pylist() if q in by_query][: max(1, n_queries)]
    cols = 1 + max(1, min(per_query, max((len(by_query[q]) for q in shown), default=1)))
    rows = max(1, len(shown))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.6, 1.45 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, q in enumerate(shown):
        hits = sorted(by_query[q])[:per_query]
        images = load_images([source_of[q]] + [src for _, src, _ in hits])
        axes[row, 0].imshow(_thumb(images[0]))
        axes[row, 0].set_title(f"query\n{q[-14:]}", fontsize=7, color="#b00")
        for j, ((rank, _, score), img) in enumerate(zip(hits, images[1:])):
            axes[row, j + 1].imshow(_thumb(img))
            axes[row, j + 1].set_title(f"#{rank} {score:.3f}", fontsize=7)
    if not shown:
        axes[0, 0].text(0, 0.5, "nothing retrieved", fontsize=10)
    fig.suptitle(
        "queries (left) and their retrieved gallery images (rank, cosine score)", fontsize=9
    )
    fig.tight_layout()
    return _png(fig)


def scores_png(scores: np.ndarray, origins: Sequence[str] | None = None) -> bytes:
    """Histogram of the selected images' scores, stacked by gallery origin when known."""
    plt = figures.pyplot()
    scores = np.asarray(scores, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if len(scores):
        bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 41)
        if origins is not None and len(set(origins)) > 1:
            names = sorted(set(origins))
            o = np.asarray(origins)
            ax.hist([scores[o == n] for n in names], bins=bins, stacked=True, label=names)
            ax.legend(fontsize=8)
        else:
            ax.hist(scores, bins=bins, color="#1f77b4")
    ax.set_xlabel("score (best crop-pair cosine similarity)")
    ax.set_ylabel("selected images")
    ax.set_title(f"{len(scores)} selected images", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def markdown(summary: dict, extra: dict | None = None, leaks: list | None = None) -> str:
    """The summary of a curation run (as ``ktray.pipeline.curation_summary.summary`` makes it)."""
    s = summary
    lines = [
        "# ktray curation",
        "",
        f"{s['queries']} queries x {s['images_per_query']} images requested: "
        f"**{s['unique_images']}** distinct gallery images selected.",
        "",
        "| | |",
        "|---|---|",
    ]
    rows = [
        (
            "images per query (count: queries)",
            ", ".join(f"{k}: {v}" for k, v in s["per_query_counts"].items()),
        ),
        (
            "queries short of the quota",
            f"{s['shortfall']['queries']} ({s['shortfall']['images']} images missing)",
        ),
        ("near-duplicates of labeled/test images excluded", s["excluded"]["images"]),
        ("gallery origins", ", ".join(f"{k}: {v}" for k, v in s["gallery_origins"].items())),
    ]
    if s.get("in_domain_fraction") is not None:
        rows.append(("in-domain fraction of the selection", f"{s['in_domain_fraction']:.3f}"))
    if s.get("score"):
        rows.append(
            (
                "score min / median / max",
                " / ".join(f"{s['score'][k]:.3f}" for k in ("min", "median", "max")),
            )
        )
    for k, v in (extra or {}).items():
        rows.append((k, v))
    lines += [f"| {k} | {v} |" for k, v in rows]
    if leaks:
        lines += [
            "",
            "Removed from the gallery as near copies of labeled / validation / test images "
            "(exact cosine of the stored embeddings, every gallery crop compared):",
            "",
            "| gallery image | near copy of | exact cosine |",
            "|---|---|---|",
        ]
        lines += [
            f"| {x['gallery_image']} | {x['protected_image']} | {x['cosine']:.4f} |"
            for x in leaks[:LEAK_ROWS]
        ]
    lines += ["", "![retrieved images](report.png)", "", "![scores](scores.png)", ""]
    return "\n".join(lines)


def write_report(
    out: str,
    queries: pa.Table,
    transfer: pa.Table,
    summary: dict,
    n_queries: int = 6,
    origins: Sequence[str] | None = None,
    extra: dict | None = None,
    leaks: list | None = None,
) -> dict:
    """Write ``report.png``, ``scores.png`` and ``report.md`` under ``out``; return their URIs."""
    paths = {
        "report_png": storage.join(out, "report.png"),
        "scores_png": storage.join(out, "scores.png"),
        "report_md": storage.join(out, "report.md"),
    }
    storage.write_bytes(paths["report_png"], grid_png(queries, transfer, n_queries))
    storage.write_bytes(paths["scores_png"], scores_png(transfer[C.SCORE].to_numpy(), origins))
    storage.write_text(paths["report_md"], markdown(summary, extra, leaks))
    return paths
