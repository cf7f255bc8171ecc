"""``kipam token create|list|revoke``: API tokens, on the database the server uses.

These commands do not talk to a server: they open the database the server uses
(``KIPAM_DATABASE_URL``, or the embedded PostgreSQL of ``KIPAM_DATA_DIR``, through the
running server's socket when it runs), so the first admin token needs no token. Whoever can
reach that database is an admin anyway. The same operations for admins over the API:
``/v1/tokens``.

The secret of a new token is printed once (table output: alone on stdout, the note on
stderr, so ``TOKEN=$(kipam token create ...)`` works); only a salted hash is stored.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import socket
import sys
from typing import TYPE_CHECKING, Any, Final

from service.auth import Scope, Tokens, generate, parse_duration
from service.rest import text
from service.rest.schemas import TokenCreatedOut, TokenList, TokenOut

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

    from service.config import Settings

__all__ = ["add_token_commands"]

_EXAMPLES: Final = """\
examples:
  kipam token create ops-admin --scope admin --expires 90d
  kipam token create eu1-prod-controller --scope allocate --pools 'eu1-prod/*' --output json
  kipam token create dashboards --scope read
  kipam token list
  kipam token revoke eu1-prod-controller
  kubectl create secret generic kipam-bootstrap --from-literal=token="$(kipam token generate)"
"""


def add_token_commands(commands: Any, run: Callable[[Coroutine[Any, Any, int]], int]) -> None:
    """Add ``kipam token`` to the ``kipam`` parser's subcommands."""
    token = commands.add_parser(
        "token",
        help="create, list or revoke API tokens (on the server's database)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tokens = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--output", "-o", choices=["table", "json", "yaml"], default="table")

    def sub(name: str, handler: Callable[..., Any], **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = tokens.add_parser(
            name,
            parents=[output],
            epilog=_EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )
        parser.set_defaults(func=lambda settings, args: run(_with_tokens(settings, args, handler)))
        return parser

    create = sub("create", _create, help="create a token; its secret is printed this once")
    create.add_argument("name", help="the token's name: the actor in the history of its changes")
    create.add_argument("--scope", required=True, choices=[s.value for s in Scope])
    create.add_argument(
        "--pools",
        action="append",
        default=[],
        metavar="PATTERN",
        help="limit a read or allocate token to pools matching PATTERN (eu1-prod/*); repeatable",
    )
    create.add_argument("--expires", metavar="DURATION", help="lifetime: 90d, 12h, 1w2d, 3600s")
    listing = sub("list", _list, help="list tokens (never their secrets)")
    listing.add_argument("--all", action="store_true", help="revoked tokens too")
    revoke = sub("revoke", _revoke, help="revoke a token (at once; other replicas within seconds)")
    revoke.add_argument("name")
    generate = tokens.add_parser(
        "generate",
        help="print a new random token without storing it (for KIPAM_BOOTSTRAP_TOKEN)",
    )
    generate.set_defaults(func=_generate)


def _generate(_settings: Settings, _args: argparse.Namespace) -> int:
    sys.stdout.write(generate() + "\n")
    return 0


def _actor() -> str:
    """Who runs the command, for ``created_by``: ``cli:user@host``."""
    user = "unknown"
    with contextlib.suppress(Exception):
        user = getpass.getuser()
    return f"cli:{user}@{socket.gethostname()}"


@contextlib.asynccontextmanager
async def _open(settings: Settings) -> AsyncIterator[Tokens]:
    from service.app import open_database, prepare_schema  # noqa: PLC0415 - a fast `--help`

    async with open_database(settings, attach=True) as (db, _):
        await prepare_schema(settings, db)
        yield Tokens(db)


async def _with_tokens(
    settings: Settings, args: argparse.Namespace, handler: Callable[..., Any]
) -> int:
    async with _open(settings) as tokens:
        await handler(tokens, args)
    return 0


def _emit(args: argparse.Namespace, body: Any, table: str) -> None:
    from service.commands import emit  # noqa: PLC0415 - it imports the gRPC client

    emit(args, body, table)


def _table(items: list[TokenOut]) -> str:
    return text.table(
        ["NAME", "SCOPE", "POOLS", "STATE", "EXPIRES", "LAST USED", "CREATED BY"],
        (
            [
                t.name,
                t.scope,
                ",".join(t.pools),
                t.state,
                t.expires_at,
                t.last_used_at,
                t.created_by,
            ]
            for t in items
        ),
    )


async def _create(tokens: Tokens, args: argparse.Namespace) -> None:
    token, secret = await tokens.create(
        args.name,
        Scope.parse(args.scope),
        pools=args.pools,
        expires_in=parse_duration(args.expires) if args.expires else None,
        created_by=_actor(),
    )
    if args.output == "table":
        sys.stdout.write(secret + "\n")
        sys.stderr.write(
            f"Token {token.name!r} ({token.scope.value}) created; store it now, it is not shown "
            "again. Send it as `Authorization: Bearer <token>` (KIPAM_TOKEN for the CLI).\n"
        )
        return
    _emit(args, TokenCreatedOut.created(token, secret), "")


async def _list(tokens: Tokens, args: argparse.Namespace) -> None:
    items = [TokenOut.from_model(t) for t in await tokens.list(include_revoked=args.all)]
    _emit(args, TokenList(items=items), _table(items))


async def _revoke(tokens: Tokens, args: argparse.Namespace) -> None:
    token, _ = await tokens.revoke(args.name)
    out = TokenOut.from_model(token)
    _emit(args, out, _table([out]))
