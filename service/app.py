"""The running service: resources built from settings, the HTTP server, graceful shutdown.

:func:`resources` opens everything long-lived (the embedded PostgreSQL when no database is
configured, the connection pool, migrations, the lock manager, the use cases) in one
``async with`` and closes it in reverse order. :func:`serve` runs the HTTP server on top of
them until SIGTERM or SIGINT.

gRPC serves ``kipam.v1`` (:mod:`service.grpc`); HTTP serves the REST API
(:mod:`service.rest`) and the health endpoints:

* ``GET /healthz``: the process is up (200, always);
* ``GET /readyz``: the database answers, the migrations are current and which lock backend
  is in use (200 when ready, 503 with the same JSON when not);
* ``GET /metrics``: Prometheus metrics (:mod:`service.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn

from service import telemetry
from service.auth import Authenticator, Tokens
from service.config import Settings, parse_listen_address
from service.errors import ListenError, PreconditionFailedError
from service.grpc.server import GrpcServer
from service.locks import LockManager
from service.metrics import PrometheusObserver, watch_kipam
from service.migrate import migrate, status
from service.rest.app import build_http_app
from service.store import Database
from service.tls import ServerTls
from service.usecases import Kipam

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from service.embedded import EmbeddedPostgres

__all__ = [
    "HttpServer",
    "Resources",
    "check_auth",
    "open_database",
    "prepare_schema",
    "resources",
    "serve",
    "use_cases",
]

_log = logging.getLogger("kipam")


@dataclass(frozen=True, slots=True)
class Resources:
    """What the adapters need, opened once per process."""

    settings: Settings
    db: Database
    locks: LockManager
    kipam: Kipam
    database: str  # "embedded" or "external", for the health output
    # What /metrics answers from.
    metrics: PrometheusObserver
    # Who may call: tokens, scopes, rate limits (everyone, when authentication is off).
    auth: Authenticator


@contextlib.asynccontextmanager
async def open_database(
    settings: Settings, *, attach: bool = False
) -> AsyncIterator[tuple[Database, str]]:
    """The connection pool, on the embedded PostgreSQL when no database is configured.

    Args:
        settings: Where the database is.
        attach: Use the embedded PostgreSQL of a running ``kipam serve`` on the same data
            directory, through its socket, rather than refusing (the directory is in use);
            one is started when none runs.

    Yields:
        The database and its kind, "embedded" or "external".
    """
    embedded: EmbeddedPostgres | None = None
    dsn = settings.database_url
    if dsn is None and attach:
        from service.embedded import running_dsn  # noqa: PLC0415 - optional extra

        dsn = running_dsn(settings.data_dir)
        if dsn is not None:
            _log.info("using the embedded PostgreSQL of the kipam serving %s", settings.data_dir)
    if dsn is None:
        from service.embedded import EmbeddedPostgres  # noqa: PLC0415 - optional extra

        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
        _log.info("embedded PostgreSQL running in %s", settings.data_dir)
    try:
        db = await Database.open(dsn, settings)
        try:
            yield db, "external" if settings.database_url else "embedded"
        finally:
            await db.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def resources(settings: Settings) -> AsyncIterator[Resources]:
    """Open the database, migrate (when asked), and build the lock manager and use cases.

    Raises:
        PreconditionFailedError: the schema is not current and migrating on start is off.
        UnavailableError: the database cannot be reached or started.
    """
    async with open_database(settings) as (db, kind):
        await prepare_schema(settings, db)
        async with use_cases(settings, db, kind) as res:
            yield res


async def prepare_schema(settings: Settings, db: Database) -> None:
    """Migrate when ``settings`` say so, else insist that the schema is current.

    Raises:
        PreconditionFailedError: the schema is not current and migrating on start is off.
    """
    async with db.connection() as conn:
        if settings.migrate_on_start:
            applied = await migrate(conn)
            if applied:
                _log.info("applied migrations: %s", ", ".join(applied))
        elif not (await status(conn)).current:
            raise PreconditionFailedError(
                "The database schema is not current; run `kipam migrate` first (or set "
                "KIPAM_MIGRATE_ON_START=true)."
            )


@contextlib.asynccontextmanager
async def use_cases(
    settings: Settings, db: Database, database: str = "external"
) -> AsyncIterator[Resources]:
    """The lock manager and use cases over an open database, as ``settings`` say."""
    locks = LockManager(settings.redis_url, ttl_s=settings.lock_ttl_s, wait_s=settings.lock_wait_s)
    await locks.start()
    metrics = PrometheusObserver()
    kipam = Kipam(
        db,
        locks,
        batch_max=settings.batch_max,
        lanes=settings.write_lanes,
        watch_poll_s=settings.watch_poll_s,
        observer=metrics,
    )
    watch_kipam(metrics, kipam)
    auth = Authenticator(
        Tokens(db),
        required=settings.auth_required,
        cache_s=settings.auth_cache_s,
        rate=settings.rate_limit,
        burst=settings.rate_burst,
    )
    try:
        yield Resources(settings, db, locks, kipam, database, metrics, auth)
    finally:
        await kipam.close()
        await locks.close()


class HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: kipam shuts everything down in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave SIGTERM and SIGINT to :func:`serve`."""
        yield


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting, finish in-flight work and close.

    Both listen addresses are bound before anything is served, so a taken port is one clear
    error (after the database starts: a data directory in use says more than its port).
    Shutdown order: gRPC health turns NOT_SERVING and both servers stop accepting; calls in
    flight get ``KIPAM_SHUTDOWN_GRACE_S`` to finish; then the lanes drain and the database
    and lock connections close.

    Raises:
        ListenError: a listen address cannot be bound.
        InvalidRequestError: the TLS files cannot be read or do not check out.
    """
    traced = telemetry.configure()  # before the database: its statements are traced too
    try:
        await _serve(settings)
    finally:
        if traced is not None:
            traced.shutdown()  # export what is still queued


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls = ServerTls.from_settings(settings)  # unusable files: one clear error, before anything
    if tls is not None:
        loop.add_signal_handler(signal.SIGHUP, tls.request_reload)
    async with resources(settings) as res:
        await check_auth(res)
        with _bind(settings.http_addr, "KIPAM_HTTP_ADDR") as http_socket:
            config = uvicorn.Config(
                build_http_app(res),
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
                # One SSLContext for uvicorn's life; it hands handshakes the current certificate.
                ssl_context_factory=tls.uvicorn_context if tls is not None else None,
            )
            grpc_server = GrpcServer(res, settings.grpc_addr)
            await grpc_server.start(tls)
            _tune_gc()
            reloader = (
                asyncio.create_task(tls.watch(settings.tls_reload_s), name="kipam-tls-reload")
                if tls is not None
                else None
            )
            try:
                _log_tls(settings)
                server = HttpServer(config)
                task = asyncio.create_task(server.serve(sockets=[http_socket]))
                _log.info(
                    "kipam serving HTTP on %s and gRPC on %s (database: %s, locks: %s)",
                    settings.http_addr,
                    settings.grpc_addr,
                    res.database,
                    res.locks.backend,
                )
                waiter = asyncio.create_task(stop.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():  # the HTTP server ended on its own: a bug, say so and stop
                    waiter.cancel()
                    task.result()
                    raise SystemExit(1)
                _log.info("shutting down (grace %.0f s)", settings.shutdown_grace_s)
                server.should_exit = True
                await asyncio.gather(grpc_server.stop(settings.shutdown_grace_s), task)
            finally:
                if reloader is not None:
                    reloader.cancel()
                await grpc_server.stop(settings.shutdown_grace_s)


def _log_tls(settings: Settings) -> None:
    """Say at start whether HTTP and gRPC are encrypted, and whether gRPC asks for client certs."""
    if not settings.tls:
        _log.info("TLS off: HTTP and gRPC are plaintext (set KIPAM_TLS_CERT and KIPAM_TLS_KEY)")
    elif settings.tls_client_ca is None:
        _log.info(
            "TLS on for HTTP and gRPC (certificate %s, checked every %.3g s and on SIGHUP)",
            settings.tls_cert,
            settings.tls_reload_s,
        )
    else:
        _log.info(
            "TLS on for HTTP and gRPC (certificate %s, checked every %.3g s and on SIGHUP); "
            "mTLS on for gRPC: callers need a certificate signed by %s",
            settings.tls_cert,
            settings.tls_reload_s,
            settings.tls_client_ca,
        )


async def check_auth(res: Resources) -> None:
    """Secure defaults: take the bootstrap token, then refuse to serve where nobody could call.

    Authentication is required whenever a listen address is beyond loopback (or
    ``KIPAM_AUTH=required``); then at least one live token must exist. Open (``KIPAM_AUTH=off``,
    or loopback by default) is said at start, loudly beyond loopback.

    Raises:
        PreconditionFailedError: authentication is required and there is no live token.
    """
    settings = res.settings
    if settings.bootstrap_token:
        await res.auth.tokens.bootstrap(settings.bootstrap_token)
    if not settings.auth_required:
        if settings.loopback_only:
            _log.warning(
                "authentication is off: kipam listens on loopback only, and every local "
                "process may change address space (set KIPAM_AUTH=required to require tokens)"
            )
        else:
            _log.warning(
                "authentication is OFF (KIPAM_AUTH=off) on a non-loopback address: anyone who "
                "can reach %s or %s may take, release or read address space",
                settings.http_addr,
                settings.grpc_addr,
            )
        return
    if not await res.auth.tokens.any_live():
        raise PreconditionFailedError(
            "Authentication is required "
            + (
                "(KIPAM_AUTH=required)"
                if settings.auth == "required"
                else "(kipam listens beyond loopback)"
            )
            + " but the database holds no live API token, so nobody could call. Create one "
            "with `kipam token create NAME --scope admin` against the same database, or set "
            "KIPAM_BOOTSTRAP_TOKEN; or set KIPAM_AUTH=off to serve without authentication."
        )
    _log.info("authentication is required (API tokens)")


def _tune_gc() -> None:
    """Keep garbage-collection pauses out of the request tail latency.

    Everything built at start-up (modules, settings, the app) lives as long as the process:
    frozen, the collector never walks it again. Requests make many short-lived objects and
    almost no cycles; a larger first-generation threshold collects them in fewer, equally
    short passes.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _bind(address: str, name: str) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 hosts in brackets).

    ``[::]`` listens on every IPv6 and IPv4 address.

    Raises:
        ListenError: the port is taken, or the host is not an address of this machine.
    """
    host, port = parse_listen_address(address, name)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # `[::]` means every address, IPv4 too (as gRPC's listener does): a dual-stack socket.
    # Python's create_server otherwise sets IPV6_V6ONLY, and IPv4 clients (a kubelet probing
    # a pod's IPv4 address) are refused.
    dualstack = host == "::" and socket.has_dualstack_ipv6()
    try:
        return socket.create_server(
            (host, port), family=family, backlog=2048, dualstack_ipv6=dualstack
        )
    except OSError as exc:
        raise ListenError(
            f"Cannot listen for HTTP on {address} ({name}): "
            f"{os.strerror(exc.errno) if exc.errno else exc}."
        ) from exc
