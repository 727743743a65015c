"""User-facing errors.

A :class:`KtrayError` carries a one-line message that names the problem (a missing path, an
unknown model, a wrong class count, ...). The CLI prints it without a traceback and exits 2.
"""


class KtrayError(Exception):
    """Bad input or configuration, reported to the user as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CorruptImageError(KtrayError):
    """An image that cannot be decoded."""
