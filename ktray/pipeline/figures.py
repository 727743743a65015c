"""Figures of the reports as PNG bytes (no ray): matplotlib without a display (``Agg``)."""

from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
