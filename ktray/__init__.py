"""ktray: knowledge transfer from vision foundation models to small task-specific models.

The library (everything outside ``ktray.stages`` and ``ktray.cli``) never imports ray.
"""

from ktray import s3_settings  # noqa: F401  (fsspec's s3 settings, in every process)

__version__ = "0.1.0"
