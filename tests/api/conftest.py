"""A real kipam gRPC server on a free port, over the session's migrated database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
from typing import TYPE_CHECKING

import httpx
import pytest_asyncio
import uvicorn

from service.app import HttpServer, use_cases
from service.client import KipamClient
from service.grpc.server import GrpcServer
from service.rest.app import build_http_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from service.config import Settings
    from service.store import Database


async def until(condition: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    """Poll ``condition`` (sync or async) until it holds; TimeoutError after ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            answer = condition()
            if await answer if inspect.isawaitable(answer) else answer:
                return
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(
    db: Database, settings: Settings, *, redis_url: str | None = None, address: str = "127.0.0.1:0"
) -> AsyncIterator[GrpcServer]:
    """One replica: its own use cases and locks over the shared database (any free port)."""
    replica = dataclasses.replace(settings, redis_url=redis_url, watch_poll_s=0.1)
    async with use_cases(replica, db) as res:
        server = GrpcServer(res, address)
        await server.start()
        try:
            yield server
        finally:
            await server.stop(1.0)


@contextlib.asynccontextmanager
async def serving_http(server: GrpcServer) -> AsyncIterator[str]:
    """The REST API over the same replica as ``server``, on a free port; yields its URL."""
    config = uvicorn.Config(
        build_http_app(server.res),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    http = HttpServer(config)
    task = asyncio.create_task(http.serve())
    await until(lambda: http.started or task.done())
    if task.done():
        await task  # raises what stopped it
    port = http.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        await task


@pytest_asyncio.fixture(name="server", loop_scope="session")
async def _server(db: Database, settings: Settings, clean: None) -> AsyncIterator[GrpcServer]:
    """A gRPC server (advisory locks) on empty tables."""
    _ = clean
    async with serving(db, settings) as server:
        yield server


@pytest_asyncio.fixture(name="http", loop_scope="session")
async def _http(server: GrpcServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the REST API of ``server``'s replica."""
    async with serving_http(server) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield http


@pytest_asyncio.fixture(name="client", loop_scope="session")
async def _client(server: GrpcServer) -> AsyncIterator[KipamClient]:
    """The typed client, connected to ``server``."""
    async with KipamClient(f"127.0.0.1:{server.port}", timeout=10.0) as client:
        yield client
