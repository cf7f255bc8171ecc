"""The ``kipam`` command line.

Exit codes follow DESIGN.md: 0 ok, 1 error, 2 usage, 3 exhausted or conflict. Errors are
one line on stderr, never a traceback. ``serve`` and ``migrate`` run the service; the rest
(:mod:`service.commands`) talk to a running server over gRPC.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from typing import TYPE_CHECKING, TypeVar

from engine import EngineError
from service import logs
from service.config import Settings
from service.errors import Kind, ServiceError, kind_of

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence

T = TypeVar("T")

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from service.app import serve  # noqa: PLC0415 - keeps `kipam --help` fast

    _run(serve(settings))
    return EXIT_OK


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.app import open_database  # noqa: PLC0415
    from service.migrate import migrate, status  # noqa: PLC0415

    async def run() -> tuple[list[str], tuple[int, ...], tuple[int, ...]]:
        async with open_database(settings) as (db, _), db.connection() as conn:
            applied = [] if args.check else await migrate(conn)
            after = await status(conn)
            return applied, after.pending, after.unknown

    applied, pending, unknown = _run(run())
    if args.output == "json":
        print(json.dumps({"applied": applied, "pending": pending, "unknown": unknown}))
    elif applied:
        print("applied: " + ", ".join(applied))
    elif pending:
        print("pending migrations: " + ", ".join(str(v) for v in pending))
    else:
        print("the database schema is current")
    return EXIT_ERROR if pending else EXIT_OK


def _run(coro: Coroutine[object, object, T]) -> T:
    import uvloop  # noqa: PLC0415 - only commands that do I/O need it

    return uvloop.run(coro)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kipam",
        description="IP address management for IPv6-first Kubernetes fleets.",
    )
    parser.add_argument("--version", action="version", version=f"kipam {version('kipam')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the service (embedded PostgreSQL unless KIPAM_DATABASE_URL is set)"
    )
    serve.set_defaults(func=_serve)
    mig = commands.add_parser("migrate", help="apply pending database migrations")
    mig.add_argument("--check", action="store_true", help="only report; exit 1 if any pending")
    mig.add_argument("--output", choices=["table", "json"], default="table")
    mig.set_defaults(func=_migrate)
    from service.commands import add_commands  # noqa: PLC0415 - the client's imports
    from service.token_commands import add_token_commands  # noqa: PLC0415

    add_commands(commands, _run)
    add_token_commands(commands, _run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kipam`` command; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        settings = Settings.from_env()
        # The server logs at KIPAM_LOG_LEVEL; client commands keep stderr for their errors.
        server = args.command in {"serve", "migrate"}
        logs.configure(settings.log_level if server else "warning", settings.log_format)
        result: int = args.func(settings, args)
    except (ServiceError, EngineError, OSError) as exc:
        message = exc.message if isinstance(exc, ServiceError | EngineError) else str(exc)
        if kind_of(exc) is Kind.UNAUTHENTICATED:
            message += " The kipam commands send one given with --token or KIPAM_TOKEN."
        print(f"kipam {args.command}: {message}", file=sys.stderr)
        return EXIT_CONFLICT if kind_of(exc) in {Kind.CONFLICT, Kind.EXHAUSTED} else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    return result


if __name__ == "__main__":
    raise SystemExit(main())
