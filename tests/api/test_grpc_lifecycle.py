"""Deadlines, cancellation and graceful shutdown of the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.app import use_cases
from service.client import KipamClient
from service.errors import Kind, ServerUnavailableError, kind_of
from service.grpc.server import GrpcServer
from service.locks import advisory_key
from service.models import PoolPolicy
from service.store import Database
from tests.api.conftest import serving, until
from tests.conftest import drop_database, migrated_database

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from service.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.api]

POLICY = PoolPolicy(default_length=64, quarantine_seconds=0)


@contextlib.asynccontextmanager
async def row_locked(dsn: str, pool: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session holds the pool's row (FOR UPDATE) until the block ends, then commits."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM pools WHERE name = $1 FOR UPDATE", pool)
            yield conn
    finally:
        await conn.close()


async def _count(db: Database, sql: str) -> int:
    row = await db.fetchrow(sql)
    assert row is not None
    return int(row[0])


async def _consistent(db: Database) -> None:
    """Every allocation has its history record and the other way round (invariant 7)."""
    rows = await db.fetch(
        "SELECT (SELECT count(*) FROM allocations) AS allocations,"
        " (SELECT count(*) FROM changes WHERE kind = 'allocation.created') AS created,"
        " (SELECT count(*) FROM allocations a WHERE NOT EXISTS (SELECT 1 FROM changes c"
        "   WHERE c.allocation_id = a.id AND c.kind = 'allocation.created')) AS orphans"
    )
    assert rows[0]["allocations"] == rows[0]["created"]
    assert rows[0]["orphans"] == 0


async def test_cancelled_calls_leave_no_lock_and_no_half_write(
    db: Database, settings: Settings, redis_url: str, clean: None
) -> None:
    """Calls cut off by deadlines and cancellation: no lock left, nothing half-written."""
    _ = clean
    rng = random.Random(4)  # noqa: S311 - jitter, not secrets
    async with serving(db, settings, redis_url=redis_url) as server:
        target = f"127.0.0.1:{server.port}"
        async with KipamClient(target) as client:
            for i in range(4):
                await client.create_pool(f"p{i}", cidr=f"fd00:{i + 1}::/48", policy=POLICY)
        cut = KipamClient(target, timeout=0.005)

        async def attempt(n: int) -> bool:
            call = cut.allocate(f"p{n % 4}", owner=f"node/n{n}", idempotency_key=f"key-{n}")
            task = asyncio.ensure_future(call)
            if n % 3 == 0:
                await asyncio.sleep(rng.random() / 500)
                task.cancel()
            try:
                await task
            except (ServerUnavailableError, asyncio.CancelledError):
                return False
            return True

        try:
            outcomes = await asyncio.gather(*(attempt(n) for n in range(200)))
        finally:
            await cut.close()
        assert outcomes.count(False) > 50  # most calls were cut off
        keys = redis.asyncio.from_url(redis_url)
        try:
            await until(lambda: _no_keys(keys))
        finally:
            await keys.aclose()
        await _consistent(db)
        async with KipamClient(target) as client:
            # Retrying with the same keys: what was committed comes back, the rest is made now.
            answers = await asyncio.gather(
                *(
                    client.allocate(f"p{n % 4}", owner=f"node/n{n}", idempotency_key=f"key-{n}")
                    for n in range(200)
                )
            )
    assert len({a.id for a, _ in answers}) == 200
    assert await _count(db, "SELECT count(*) FROM allocations") == 200
    await _consistent(db)


async def _no_keys(client: redis.asyncio.Redis) -> bool:
    return not [k async for k in client.scan_iter("kipam:pool:*")]


async def test_graceful_shutdown_finishes_calls_in_flight(
    db: Database, dsn: str, settings: Settings, clean: None
) -> None:
    """On stop: new calls are refused, the call in flight finishes within the grace period."""
    _ = clean
    async with serving(db, settings) as server:
        target = f"127.0.0.1:{server.port}"
        async with KipamClient(target) as client:
            await client.create_pool("p", cidr="fd00:1::/48", policy=POLICY)
            async with row_locked(dsn, "p") as blocker:
                in_flight = asyncio.ensure_future(client.allocate("p", owner="node/slow"))

                async def waiting() -> bool:
                    return bool(
                        await blocker.fetchval(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> $1",
                            blocker.get_server_pid(),
                        )
                    )

                await until(waiting)
                stopping = asyncio.ensure_future(server.stop(30.0))
                async with KipamClient(target, timeout=5) as late:

                    async def refused() -> bool:
                        try:
                            await late.get_pool("p")
                        except ServerUnavailableError:
                            return True
                        return False

                    await until(refused)
            allocation, created = await in_flight
            assert created
            assert str(allocation.prefix) == "fd00:1::/64"
            await stopping


async def test_deadline_while_waiting_leaves_an_answer_for_the_retry(
    db: Database, dsn: str, client: KipamClient
) -> None:
    """A deadline passing inside the transaction: all or nothing; the keyed retry gets it."""
    await client.create_pool("p", cidr="fd00:1::/48", policy=POLICY)
    async with row_locked(dsn, "p"):
        impatient = KipamClient(client.server, timeout=0.3)
        try:
            with pytest.raises(ServerUnavailableError) as caught:
                await impatient.allocate("p", owner="node/a", idempotency_key="once")
            assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)
            assert caught.value.__cause__.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await impatient.close()
    allocation, _ = await client.allocate("p", owner="node/a", idempotency_key="once")
    again, created = await client.allocate("p", owner="node/a", idempotency_key="once")
    assert (again.id, created) == (allocation.id, False)
    assert len((await client.list_allocations(pool="p")).items) == 1
    await _consistent(db)


async def test_lock_timeout_is_unavailable(db: Database, settings: Settings, clean: None) -> None:
    """A pool lock not granted within the wait is UNAVAILABLE (retryable), nothing written."""
    _ = clean
    quick = dataclasses.replace(settings, lock_wait_s=0.2)
    async with serving(db, quick) as server, KipamClient(f"127.0.0.1:{server.port}") as client:
        await client.create_pool("p", cidr="fd00:1::/48", policy=POLICY)
        pool_id = await _count(db, "SELECT id FROM pools WHERE name = 'p'")
        async with db.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *advisory_key(pool_id))
            with pytest.raises(Exception) as caught:  # noqa: PT011
                await client.allocate("p", owner="node/a")
        assert kind_of(caught.value) is Kind.UNAVAILABLE
    assert await _count(db, "SELECT count(*) FROM allocations") == 0


async def test_health_follows_the_database(
    server_dsn: str, settings: Settings, free_port: Callable[[], int]
) -> None:
    """Health is SERVING while the database answers and NOT_SERVING once it is gone."""
    async with migrated_database(server_dsn) as dsn:
        db = await Database.open(dsn, settings)
        try:
            async with use_cases(settings, db) as res:
                server = GrpcServer(res, f"127.0.0.1:{free_port()}", probe_s=0.05)
                await server.start()
                try:
                    async with grpc.aio.insecure_channel(server.address) as channel:
                        stub = health_pb2_grpc.HealthStub(channel)

                        async def status() -> int:
                            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                            return int(answer.status)

                        assert await status() == health_pb2.HealthCheckResponse.SERVING
                        await drop_database(server_dsn, dsn)  # the database goes away under it

                        async def not_serving() -> bool:
                            return await status() == health_pb2.HealthCheckResponse.NOT_SERVING

                        await until(not_serving)
                finally:
                    await server.stop(1.0)
        finally:
            await db.close()
