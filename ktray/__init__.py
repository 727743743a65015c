"""ktray: knowledge transfer from vision foundation models to small task-specific models.

The library (everything outside ``ktray.stages`` and ``ktray.cli``) never imports ray.
"""

__version__ = "0.1.0"
