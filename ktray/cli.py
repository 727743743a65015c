"""The ``ktray`` command line. ``main(argv)`` takes an argument list, so tests call it in-process.

Every subcommand takes a CONFIG (a YAML path, or the name of a packaged config such as
``demo``) followed by ``key.sub=value`` overrides, e.g.
``ktray run configs/imagefolder.yaml data.root=DIR out=OUT``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ktray.cli_parser import build_parser
from ktray.errors import KtrayError

__all__ = ["build_parser", "main", "parse_args"]


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("ktray")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s ktray %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a subcommand's flags and ``key=value`` overrides may come in
    any order (``ktray logits CONFIG --transfer in_domain out=OUT``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if (
        at is None
        or argv[at] not in sub.choices
        or any(a not in ("-v", "--verbose") for a in argv[:at])
    ):
        return parser.parse_args(argv)  # help, a usage error or an unknown command
    args = sub.choices[argv[at]].parse_intermixed_args(argv[at + 1 :])
    args.command, args.verbose = argv[at], bool(argv[:at])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.verbose)
    try:
        from ktray.storage import listings_fixed

        with listings_fixed():  # the inputs as they were when the command started
            args.fn(args)
    except KtrayError as e:
        print(f"ktray: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ktray.storage import storage_error

        err = storage_error(e, "")  # an object-store failure past the up-front probes
        if err is None:
            raise
        print(f"ktray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ktray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
