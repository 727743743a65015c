"""The Config-aware layer: task preparation, curation planning, sweep parsing, validation,
manifests and reuse, cost accounting, reporting and MLflow tracking.

It reads :class:`ktray.config.Config` and drives the core library (``ktray.data``,
``ktray.models``, ``ktray.retrieval``, ``ktray.train``, ...) but never imports ray: only
``ktray.stages`` (and the CLI through it) orchestrates with Ray.
"""
