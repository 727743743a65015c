"""Gallery embeddings stored as Parquet part files, read one part at a time.

At 10M-100M crops the gallery's vectors never fit in the driver together: a
:class:`PartStore` knows every part's row count from the Parquet footers (no data read) and
gives the vectors part by part (to fill an index), a training sample drawn from a random
subset of parts, and exact vectors by id (to re-check approximate near-duplicate hits). Vector
ids are global row numbers in part order, the order the index numbers them. The
``embedding`` column may be float32 or float16 lists (fixed-size or not); vectors come back
as float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ktray import storage
from ktray.data import columns as C
from ktray.errors import KtrayError


def column_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list column (``list<float16|float32>``, fixed-size or not) as ``[N, D]`` float32."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    else:
        dim = len(col[0]) if n else 0
    flat = pa.compute.list_flatten(col).to_numpy(zero_copy_only=False)
    if len(flat) != n * dim:
        raise KtrayError(f"embedding lists of unequal lengths ({len(flat)} values, {n} rows)")
    return np.asarray(flat, np.float32).reshape(n, dim)


class PartStore:
    """Random and sequential access to the ``embedding`` column of part files.

    Args:
        parts: part file URIs in vector-id order.
        column: the vector column.
    """

    def __init__(self, parts: list[str], column: str = C.EMBEDDING):
        self.parts = list(parts)
        self.column = column
        counts = []
        for f in self.parts:
            fs, path = storage.fs_and_path(f)
            counts.append(pq.ParquetFile(path, filesystem=fs).metadata.num_rows)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.reads = 0  # part files read so far (tests and benchmarks count passes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, part: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Vectors of one part (``rows``: local row numbers to keep) as float32 ``[N, D]``."""
        fs, path = storage.fs_and_path(self.parts[part])
        table = pq.read_table(path, columns=[self.column], filesystem=fs)
        self.reads += 1
        col = table[self.column]
        if rows is not None:
            col = col.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return column_matrix(col)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Every part's vectors in order (one part held at a time)."""
        for i in range(len(self.parts)):
            yield self.read(i)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of global ids ``[N]`` (any order, repeats allowed) as ``[N, D]``; only the
        parts that hold them are read."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise KtrayError(f"vector ids out of range [0, {len(self)})")
        part = np.searchsorted(self.offsets, ids, side="right") - 1
        out: np.ndarray | None = None
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            vec = self.read(int(p), ids[sel] - self.offsets[p])
            if out is None:
                out = np.empty((len(ids), vec.shape[1]), np.float32)
            out[sel] = vec
        return out if out is not None else np.zeros((0, 0), np.float32)

    def sample(self, size: int, seed: int, oversample: int = 4) -> np.ndarray:
        """``size`` vectors drawn from a random subset of parts.

        Parts are taken in a seeded random order until they hold ``oversample x size`` rows
        (or all parts are taken), then ``size`` rows are drawn uniformly from them: only those
        parts are read, so a 10k-vector sample of a 1,000-part gallery reads a few parts.
        """
        size = int(min(size, len(self)))
        if size <= 0:
            return np.zeros((0, 0), np.float32)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.parts))
        covered = np.cumsum(self.counts[order])
        take = int(np.searchsorted(covered, oversample * size)) + 1
        chosen = np.sort(order[:take])
        pool = int(self.counts[chosen].sum())
        picks = np.sort(rng.choice(pool, size, replace=False))
        local_offsets = np.concatenate([[0], np.cumsum(self.counts[chosen])])
        out = []
        for j, p in enumerate(chosen):
            lo, hi = local_offsets[j], local_offsets[j + 1]
            rows = picks[(picks >= lo) & (picks < hi)] - lo
            if len(rows):
                out.append(self.read(int(p), rows))
        return np.concatenate(out)
