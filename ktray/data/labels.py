"""Class labels of labeled tables: integer class indices from 0, or class names.

Parquet label columns may hold either; :func:`encode_labels` turns them into indices and
refuses, in one line, what would silently make a wrong task (a string label without class
names, an index outside the classes, a negative one).
"""

from __future__ import annotations

from ktray.data import columns as C
from ktray.errors import KtrayError


def label_names(values: set, where: str, column: str) -> list[str] | None:
    """The sorted class names when ``values`` are strings, None when they are numbers.

    Raises:
        KtrayError: Strings mixed with numbers.
    """
    strings = {v for v in values if isinstance(v, str)}
    if strings and len(strings) != len(values):
        raise KtrayError(f"label column {column!r} at {where} mixes strings and numbers")
    return sorted(strings) if strings else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def encode_labels(raw: list, class_names: list[str] | None, where: str, column: str) -> list:
    """Labels as class indices (None -> unlabeled).

    Args:
        raw: Integers (class indices) or strings (class names) or None.
        class_names: The classes in label order, if known.
        where: The file, for messages.
        column: The label column, for messages.

    Raises:
        KtrayError: A name not in ``class_names`` (or no names), an index out of range.
    """
    index = {n: i for i, n in enumerate(class_names or [])}
    out = []
    for v in raw:
        if v is None:
            out.append(C.UNLABELED)
        elif isinstance(v, str):
            if v not in index:
                hint = (
                    "give data.class_names (or classes.txt) with every name"
                    if class_names is None
                    else f"not one of the {len(index)} class names"
                )
                raise KtrayError(f"label {v!r} in column {column!r} of {where}: {hint}")
            out.append(index[v])
        elif _is_int(v) or (isinstance(v, float) and v.is_integer()):
            v = int(v)
            if v < 0 or (class_names is not None and v >= len(class_names)):
                top = f"0..{len(class_names) - 1}" if class_names is not None else ">= 0"
                raise KtrayError(f"label {v} in column {column!r} of {where} must be {top}")
            out.append(v)
        else:
            raise KtrayError(
                f"label {v!r} in column {column!r} of {where} is neither an "
                "integer class index nor a class name"
            )
    return out
