"""The ``kipam`` command line.

Exit codes follow DESIGN.md: 0 ok, 1 error, 2 usage, 3 exhausted or conflict.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _serve(_args: argparse.Namespace) -> int:
    # The store, the APIs and the embedded PostgreSQL default arrive with the service issues
    # (#3 store and use cases, #4 gRPC, #5 REST). Say so plainly instead of pretending to serve.
    print(
        "kipam serve: the service is not built yet. This release contains the allocation "
        "engine (the `engine` package); the PostgreSQL store, the gRPC and REST APIs and the "
        "embedded database default come with the next issues.",
        file=sys.stderr,
    )
    return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kipam",
        description="IP address management for IPv6-first Kubernetes fleets.",
    )
    parser.add_argument("--version", action="version", version=f"kipam {version('kipam')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the kipam service")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kipam`` command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
