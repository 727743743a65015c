"""The curate manifest's account of a selection (no ray here): counts per query, shortfall and
its reasons, exclusions, gallery duplicates, origins, scores, and the leak check's examples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ktray.data import columns as C
from ktray.pipeline.curation import GALLERY, IN_DOMAIN, ORIGIN, origins_of


def summary(
    gallery: pa.Table,
    queries: pa.Table,
    transfer: pa.Table,
    shortfall: dict,
    excluded: set[int],
    images_per_query: int,
    examples: int = 20,
    duplicates: set[int] | None = None,
    reasons: dict | None = None,
    capped: list | None = None,
) -> dict:
    """The manifest's account of a selection: counts per query, shortfall, exclusions.

    Work is per query and per excluded image; the gallery is only counted (Arrow), never
    turned into Python objects.
    """
    per_query = {q: 0 for q in queries[C.IMAGE_ID].to_pylist()}
    for q in transfer[C.QUERY_ID].to_pylist():
        per_query[q] = per_query.get(q, 0) + 1
    counts: dict[int, int] = {}
    for n in per_query.values():
        counts[n] = counts.get(n, 0) + 1
    # queries whose every crop was unreadable never reached the selection: they are short too
    short = {q: images_per_query - n for q, n in per_query.items() if n < images_per_query}
    short.update({str(q): int(v) for q, v in shortfall.items()})
    why = {str(q): r for q, r in (reasons or {}).items()}
    by_reason: dict[str, int] = {}
    for q in short:
        r = why.get(q, "unreadable query")
        by_reason[r] = by_reason.get(r, 0) + 1
    chosen = origins_of(gallery, transfer)
    known = [o for o in chosen if o != GALLERY]
    vc = pc.value_counts(gallery[ORIGIN]).to_pylist() if len(gallery) else []
    duplicates = duplicates or set()
    return {
        "queries": len(per_query),
        "images_per_query": images_per_query,
        "unique_images": len(set(transfer[C.IMAGE_ID].to_pylist())),
        "per_query_counts": {str(k): v for k, v in sorted(counts.items())},
        "shortfall": {
            "queries": len(short),
            "images": int(sum(short.values())),
            "by_reason": dict(sorted(by_reason.items())),
            "examples": dict(sorted(short.items())[:examples]),
        },
        "capped_queries": len(capped or []),
        "excluded": {"images": len(excluded), "examples": _ids(gallery, excluded, examples)},
        "gallery_duplicates": {
            "images": len(duplicates),
            "examples": _ids(gallery, duplicates, examples),
        },
        "gallery_origins": {
            d["values"]: d["counts"] for d in sorted(vc, key=lambda d: d["values"])
        },
        "in_domain_fraction": (sum(o == IN_DOMAIN for o in known) / len(known))
        if known and len(known) == len(chosen)
        else None,
        "score": _score_stats(transfer[C.SCORE].to_numpy()),
    }


def leak_examples(gallery: pa.Table, protected_ids: list, pairs: list) -> list[dict]:
    """The leak check's examples (``(gallery row, protected row, exact cosine, ...)``) with
    image ids: which gallery image was removed for which protected image."""
    return [
        {
            "gallery_image": gallery[C.IMAGE_ID][int(g)].as_py(),
            "protected_image": str(protected_ids[int(r)]),
            "cosine": float(cos),
        }
        for g, r, cos, *_ in pairs
    ]


def _ids(gallery: pa.Table, rows: set[int], n: int) -> list[str]:
    """The image ids of the first ``n`` gallery rows of ``rows``, sorted."""
    take = pa.array(sorted(rows)[:n], pa.int64())
    return sorted(gallery[C.IMAGE_ID].take(take).to_pylist())


def _score_stats(scores: np.ndarray) -> dict | None:
    if not len(scores):
        return None
    q = np.quantile(scores, [0.0, 0.5, 1.0])
    return {
        "min": float(q[0]),
        "median": float(q[1]),
        "max": float(q[2]),
        "mean": float(scores.mean()),
    }
