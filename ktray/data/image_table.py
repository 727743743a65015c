"""The image table: the one table every reader returns.

An image table is a ``pyarrow.Table`` with ``image_id: string`` (unique), ``source: string`` (an
image source string, see :mod:`ktray.data.sources`) and ``label: int64`` (-1 when unlabeled).
"""

from __future__ import annotations

import pyarrow as pa

from ktray.data import columns as C

IMAGE_TABLE_SCHEMA = pa.schema(
    [(C.IMAGE_ID, pa.string()), (C.SOURCE, pa.string()), (C.LABEL, pa.int64())]
)


def make_image_table(image_ids, sources, labels=None) -> pa.Table:
    """Build an image table; ``labels=None`` means every row is unlabeled (-1)."""
    image_ids, sources = [str(i) for i in image_ids], [str(s) for s in sources]
    if labels is None:
        labels = [C.UNLABELED] * len(image_ids)
    return pa.table(
        [
            pa.array(image_ids, pa.string()),
            pa.array(sources, pa.string()),
            pa.array(labels, pa.int64()),
        ],
        schema=IMAGE_TABLE_SCHEMA,
    )
