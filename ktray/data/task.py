"""Task assembly on image tables: per-class subsampling, validation splits, class counts.

Selection is driven by a hash of ``(seed, image_id)``, not by row order, so it is the same
whatever order the reader produced, and the images chosen for ``n`` per class are a subset of
those chosen for ``n + 1`` with the same seed.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pyarrow as pa

from ktray.data import columns as C
from ktray.errors import KtrayError


def _rank_key(seed: int, image_id: str, salt: str) -> bytes:
    return hashlib.blake2b(f"{salt}\x1f{seed}\x1f{image_id}".encode(), digest_size=8).digest()


def _by_class(table: pa.Table) -> dict[int, list[int]]:
    """Row indices per label (labels >= 0 only), sorted by label."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(table.column(C.LABEL).to_pylist()):
        if label is not None and label >= 0:
            groups[int(label)].append(i)
    return dict(sorted(groups.items()))


def _ranked(ids: list[str], rows: list[int], seed: int, salt: str) -> list[int]:
    # A salt per use keeps the validation draw independent of the per-class draw.
    return sorted(rows, key=lambda r: _rank_key(seed, ids[r], salt))


def _take_split(table: pa.Table, chosen: list[int]) -> tuple[pa.Table, pa.Table]:
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[chosen] = True
    keep = np.flatnonzero(mask)
    rest = np.flatnonzero(~mask)
    return table.take(pa.array(keep, pa.int64())), table.take(pa.array(rest, pa.int64()))


def class_counts(table: pa.Table) -> dict[int, int]:
    """Number of rows per label, sorted by label (unlabeled rows counted under -1)."""
    counts: dict[int, int] = defaultdict(int)
    for label in table.column(C.LABEL).to_pylist():
        counts[C.UNLABELED if label is None else int(label)] += 1
    return dict(sorted(counts.items()))


def subsample_per_class(table: pa.Table, n_per_class: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Choose ``n_per_class`` labeled rows of every class.

    Args:
        table: An image table.
        n_per_class: Rows to keep per class (> 0).
        seed: Selection seed.

    Returns:
        ``(selected, rest)``, both in the original row order; unlabeled rows go to ``rest``.

    Raises:
        KtrayError: No labeled rows, or a class with fewer than ``n_per_class`` rows.
    """
    if n_per_class <= 0:
        raise KtrayError(f"n_per_class must be positive, not {n_per_class}")
    groups = _by_class(table)
    if not groups:
        raise KtrayError("cannot subsample per class: the table has no labeled rows")
    ids = table.column(C.IMAGE_ID).to_pylist()
    chosen = []
    for label, rows in groups.items():
        if len(rows) < n_per_class:
            raise KtrayError(
                f"class {label} has {len(rows)} images, fewer than the "
                f"{n_per_class} per class asked for"
            )
        chosen += _ranked(ids, rows, seed, "subsample")[:n_per_class]
    return _take_split(table, chosen)


def split_validation(
    table: pa.Table, fraction_or_n: float | int, seed: int
) -> tuple[pa.Table, pa.Table]:
    """Split off a validation set, stratified by class.

    Args:
        table: An image table (unlabeled rows are split as one group).
        fraction_or_n: A float in (0, 1): that fraction of each class (rounded, at least one
            image); an int >= 1: that many images of each class. 0 gives an empty validation
            set.
        seed: Selection seed.

    Returns:
        ``(train, val)``, both in the original row order.

    Raises:
        KtrayError: A bad fraction, or a class that would keep no training image.
    """
    if fraction_or_n == 0:
        return table, table.slice(0, 0)
    is_fraction = isinstance(fraction_or_n, float) and 0.0 < fraction_or_n < 1.0
    if not is_fraction and not (float(fraction_or_n).is_integer() and fraction_or_n >= 1):
        raise KtrayError(
            f"validation split must be a fraction in (0, 1) or a count >= 1, not {fraction_or_n}"
        )
    groups = _by_class(table)
    labels = table.column(C.LABEL).to_pylist()
    unlabeled = [i for i, label in enumerate(labels) if label is None or label < 0]
    if unlabeled:
        groups[C.UNLABELED] = unlabeled
    ids = table.column(C.IMAGE_ID).to_pylist()
    chosen = []
    for label, rows in groups.items():
        if is_fraction:
            n = max(1, int(round(fraction_or_n * len(rows))))
        else:
            n = int(fraction_or_n)
        if n >= len(rows):
            raise KtrayError(
                f"class {label} has {len(rows)} images: too few to hold out {n} "
                f"for validation and keep some for training"
            )
        chosen += _ranked(ids, rows, seed, "validation")[:n]
    val, train = _take_split(table, chosen)
    return train, val
