"""The ``kipam`` commands that talk to a running server over gRPC (:mod:`service.client`).

``kipam pool create|list|show|usage|delete``, ``kipam allocate``, ``kipam release`` and
``kipam lookup``; the cluster commands are in :mod:`service.cluster_commands`. The
server is ``--server`` or ``KIPAM_SERVER`` (default the local default address). Output is
``--output table`` (aligned, for people), ``json`` or ``yaml`` (the REST API's shapes, for
scripts). Failures are one line on stderr with the exit codes of :mod:`service.cli`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from opentelemetry import propagate, trace

from engine import Strategy
from service import telemetry
from service.client import DEFAULT_SERVER, KipamClient
from service.errors import InvalidRequestError, ServerUnavailableError
from service.models import DEFAULT_QUARANTINE_S, PoolPolicy, to_prefix
from service.observe import tracer
from service.rest import text
from service.rest.schemas import AllocationOut, PoolOut, UsageOut
from service.tls import client_credentials

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from service.models import Allocation, Pool

__all__ = ["add_commands", "emit", "key_values"]

_EXAMPLES: Final = """\
examples:
  kipam pool create eu1 --cidr fd3c:9e12:7a40::/48 --default-length 64
  kipam pool create eu1-prod/pod --parent eu1 --prefix-length 52 --role pod --default-length 64
  kipam allocate eu1-prod/pod --owner node/worker-7 --idempotency-key worker-7 --output json
  kipam lookup fd3c:9e12:7a40::7 --at 2026-11-24T09:00:00Z
  kipam release 42
"""


def add_commands(commands: Any, run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """Add the client commands to the ``kipam`` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("KIPAM_SERVER") or DEFAULT_SERVER,
        help="gRPC address of a kipam server (env KIPAM_SERVER; default %(default)s)",
    )
    common.add_argument("--output", "-o", choices=["table", "json", "yaml"], default="table")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    common.add_argument(
        "--token",
        default=os.environ.get("KIPAM_TOKEN") or None,
        help="bearer token sent with every call (env KIPAM_TOKEN)",
    )
    common.add_argument(
        "--tls", action="store_true", help="connect over TLS, trusting the system's CAs"
    )
    common.add_argument(
        "--ca-cert",
        type=Path,
        default=os.environ.get("KIPAM_CA_CERT") or None,
        help="PEM CA bundle to trust for the server's certificate (env KIPAM_CA_CERT; "
        "implies --tls)",
    )
    common.add_argument(
        "--client-cert",
        type=Path,
        default=os.environ.get("KIPAM_CLIENT_CERT") or None,
        help="PEM client certificate, for a server that requires one (mTLS; env "
        "KIPAM_CLIENT_CERT; implies --tls)",
    )
    common.add_argument(
        "--client-key",
        type=Path,
        default=os.environ.get("KIPAM_CLIENT_KEY") or None,
        help="PEM private key of --client-cert (env KIPAM_CLIENT_KEY)",
    )

    def command(
        parent: Any,
        name: str,
        handler: Callable[..., Awaitable[None]],
        *,
        epilog: str = _EXAMPLES,
        **kw: Any,
    ) -> Any:
        sub = parent.add_parser(
            name,
            parents=[common],
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )
        sub.set_defaults(func=lambda _settings, args: _call(run, handler, args))
        return sub

    from service.cluster_commands import add_cluster_commands  # noqa: PLC0415 - it imports this

    _add_pool_commands(commands, command)
    _add_allocation_commands(commands, command)
    add_cluster_commands(commands, command)


def _add_pool_commands(commands: Any, command: Callable[..., Any]) -> None:
    pool = commands.add_parser("pool", help="create, list, show, measure or delete pools")
    pools = pool.add_subparsers(dest="pool_command", metavar="COMMAND", required=True)
    create = command(pools, "create", _pool_create, help="create a root or child pool")
    create.add_argument("name")
    create.add_argument("--cidr", help="a root pool's CIDR, or a child pool's exact CIDR")
    create.add_argument("--parent", help="carve the pool from this pool")
    create.add_argument("--prefix-length", type=int, help="a child pool's length")
    create.add_argument("--role", default="container")
    create.add_argument("--space", default="")
    create.add_argument("--default-length", type=int)
    create.add_argument("--min-length", type=int)
    create.add_argument("--max-length", type=int)
    create.add_argument("--alignment-bits", type=int)
    create.add_argument("--strategy", choices=["lowest", "best_fit"], default="lowest")
    create.add_argument("--reserve", action="append", default=[], metavar="CIDR")
    create.add_argument("--quarantine", type=int, metavar="SECONDS")
    create.add_argument("--allow-documentation", action="store_true")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--idempotency-key")
    listing = command(pools, "list", _pool_list, help="list pools (every page)")
    listing.add_argument("--space", default="")
    listing.add_argument("--role")
    listing.add_argument("--parent", default="")
    listing.add_argument("--selector", default="", help="label selector: k=v,k2!=v2,k3,!k4")
    listing.add_argument("--family", type=int, choices=[4, 6], default=0)
    command(pools, "show", _pool_show, help="show one pool").add_argument("name")
    usage = command(pools, "usage", _pool_usage, help="how full a pool is")
    usage.add_argument("name")
    usage.add_argument("--length", type=int, help="also count the free prefixes of this length")
    command(pools, "delete", _pool_delete, help="delete an empty pool").add_argument("name")


def _add_allocation_commands(commands: Any, command: Callable[..., Any]) -> None:
    allocate = command(commands, "allocate", _allocate, help="allocate a prefix from a pool")
    allocate.add_argument("pool")
    allocate.add_argument("--owner", required=True, help="kind/name, e.g. node/worker-7")
    target = allocate.add_mutually_exclusive_group()
    target.add_argument("--length", type=int, help="the prefix length (default: the pool's)")
    target.add_argument("--prefix", help="exactly this prefix")
    allocate.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    allocate.add_argument("--idempotency-key", help="makes retries of this command safe")
    allocate.add_argument("--dry-run", action="store_true", help="show what would be taken")
    release = command(commands, "release", _release, help="release an allocation by id")
    release.add_argument("id", type=int)
    lookup = command(commands, "lookup", _lookup, help="who holds (or held) an address")
    lookup.add_argument("address")
    lookup.add_argument("--at", type=_time, help="RFC 3339 time, e.g. 2026-11-24T09:00:00Z")


def _call(
    run: Callable[[Coroutine[Any, Any, None]], None],
    handler: Callable[[KipamClient, argparse.Namespace], Awaitable[None]],
    args: argparse.Namespace,
) -> int:
    async def go() -> None:
        tls = args.tls or any((args.ca_cert, args.client_cert, args.client_key))
        credentials = (
            client_credentials(args.ca_cert, args.client_cert, args.client_key) if tls else None
        )
        async with KipamClient(
            args.server, timeout=args.timeout, credentials=credentials, token=args.token
        ) as client:
            try:
                await handler(client, args)
            except ServerUnavailableError as exc:
                raise ServerUnavailableError(
                    f"no answer from the kipam server at {args.server} (--server, "
                    f"KIPAM_SERVER): {exc.message}"
                ) from exc

    # With OTEL_* set, the command is a trace of its own (continuing the script's, when it
    # exports TRACEPARENT), and its calls carry it to the server.
    traced = telemetry.configure(instrument=False)
    words = [args.command, *(getattr(args, f"{args.command}_command", None) or "").split()]
    parent = propagate.extract({"traceparent": os.environ.get("TRACEPARENT", "")})
    try:
        with tracer.start_as_current_span(
            "kipam " + " ".join(words), context=parent, kind=trace.SpanKind.CLIENT
        ):
            run(go())
    finally:
        if traced is not None:
            traced.shutdown()
    return 0


def _time(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} needs a time zone, e.g. ...Z")
    return parsed


def key_values(pairs: list[str], flag: str) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options (``--label``, ``--set``) as a map, taken as written.

    Raises:
        InvalidRequestError: one without ``=`` or without a key.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"{flag} {pair!r} is not KEY=VALUE.", field=flag)
        out[key] = value
    return out


def emit(args: argparse.Namespace, body: Any, table: str) -> None:
    """Write ``body`` as ``--output`` says: JSON, YAML, or the aligned ``table``."""
    if args.output == "json":
        sys.stdout.write(msgspec.json.encode(body).decode() + "\n")
    elif args.output == "yaml":
        sys.stdout.write(msgspec.yaml.encode(body).decode())
    else:
        sys.stdout.write(table)


def _pools(args: argparse.Namespace, pools: list[Pool], *, one: bool = False) -> None:
    out = [PoolOut.from_model(p) for p in pools]
    emit(args, out[0] if one else out, text.pools(out))


def _allocations(args: argparse.Namespace, items: list[Allocation], *, one: bool) -> None:
    out = [AllocationOut.from_model(a) for a in items]
    emit(args, out[0] if one else out, text.allocations(out))


async def _pool_create(client: KipamClient, args: argparse.Namespace) -> None:
    policy = PoolPolicy(
        default_length=args.default_length,
        min_length=args.min_length,
        max_length=args.max_length,
        alignment_bits=args.alignment_bits,
        strategy=Strategy(args.strategy),
        reserved=tuple(to_prefix(r, "reserve") for r in args.reserve),
        quarantine_seconds=(DEFAULT_QUARANTINE_S if args.quarantine is None else args.quarantine),
        allow_documentation=args.allow_documentation,
    )
    pool, _ = await client.create_pool(
        args.name,
        cidr=args.cidr,
        parent=args.parent,
        prefix_length=args.prefix_length,
        role=args.role,
        space=args.space,
        policy=policy,
        labels=key_values(args.label, "--label"),
        idempotency_key=args.idempotency_key,
    )
    _pools(args, [pool], one=True)


async def _pool_list(client: KipamClient, args: argparse.Namespace) -> None:
    found: list[Pool] = []
    token = ""
    while True:
        page = await client.list_pools(
            space=args.space,
            role=args.role,
            parent=args.parent,
            selector=args.selector,
            family=args.family,
            page_size=1000,
            page_token=token,
        )
        found += page.items
        if page.next_cursor is None:
            break
        token = page.next_cursor
    _pools(args, found)


async def _pool_show(client: KipamClient, args: argparse.Namespace) -> None:
    _pools(args, [await client.get_pool(args.name)], one=True)


async def _pool_usage(client: KipamClient, args: argparse.Namespace) -> None:
    usage = UsageOut.from_model(await client.usage(args.name, length=args.length))
    emit(args, usage, text.usage(usage))


async def _pool_delete(client: KipamClient, args: argparse.Namespace) -> None:
    await client.delete_pool(args.name)
    if args.output == "table":
        sys.stdout.write(f"pool {args.name} deleted\n")
    else:
        emit(args, {"deleted": args.name}, "")


async def _allocate(client: KipamClient, args: argparse.Namespace) -> None:
    allocation, _ = await client.allocate(
        args.pool,
        owner=args.owner,
        length=args.length,
        prefix=args.prefix,
        labels=key_values(args.label, "--label"),
        idempotency_key=args.idempotency_key,
        dry_run=args.dry_run,
    )
    _allocations(args, [allocation], one=True)


async def _release(client: KipamClient, args: argparse.Namespace) -> None:
    _allocations(args, [await client.release(args.id)], one=True)


async def _lookup(client: KipamClient, args: argparse.Namespace) -> None:
    _allocations(args, await client.lookup(args.address, at=args.at), one=False)
