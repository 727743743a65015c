"""Shared body of the ``jobs/*.py`` Ray job entry points (see jobs/README.md).

A job's working directory is the uploaded copy of this repository: its ``ktray`` package is put
first on ``sys.path`` so the job runs the code that was submitted, not an older installed copy.
Inside a Ray job ``RAY_ADDRESS`` is set, so ktray joins the cluster instead of starting Ray.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(command: str, argv: list[str] | None = None) -> int:
    """Run ``ktray COMMAND ARGV...`` in this process and return its exit code."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from ktray import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        script = os.path.basename(sys.argv[0]) or f"{command}.py"
        print(
            f"usage: python jobs/{script} CONFIG [key=value ...]  "
            f"(runs `ktray {command} CONFIG key=value ...`)",
            file=sys.stderr,
        )
        return 0 if argv else 2
    print(
        f"ktray job: {command} {' '.join(argv)}\n  python {sys.executable}\n"
        f"  ktray {os.path.dirname(cli.__file__)}\n"
        f"  ray {os.environ.get('RAY_ADDRESS') or '(local)'}",
        file=sys.stderr,
        flush=True,
    )
    return cli.main([command, *argv])
