"""Per-pool locks (service/locks.py) against a real Redis and a real PostgreSQL.

The servers are the shared ``redis_url`` and ``server_dsn`` fixtures (tests/conftest.py). Every
test uses pool ids of its own, so tests and concurrent runs do not contend. Tests that need a
Redis to vanish and come back run their own ``redis-server`` (``start_redis``) on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import pytest
from redis.asyncio import Redis

from service.errors import LockTimeoutError
from service.locks import (
    ADVISORY_NAMESPACE,
    LockHold,
    LockManager,
    advisory_key,
    begin_with_locks,
)

if TYPE_CHECKING:
    import subprocess
    from collections.abc import AsyncIterator, Awaitable, Callable
    from typing import TypeAlias

    Connect: TypeAlias = Callable[[], Awaitable[asyncpg.Connection]]
    Start: TypeAlias = Callable[..., Awaitable[LockManager]]

pytestmark = pytest.mark.integration

# Set from the shared server fixtures before every test (see _servers).
REDIS_URL = ""
DATABASE_URL = ""
LOGGER = "service.locks"
FALLBACK = "redis unreachable, falling back to PostgreSQL advisory locks"
BACK = "redis reachable again, back to redis locks"
DEADLINE_S = 10.0
BACKENDS = ["redis", "advisory"]


@pytest.fixture(autouse=True)
def _servers(redis_url: str, server_dsn: str) -> None:
    """Point this module's helpers at the session's real Redis and PostgreSQL."""
    global REDIS_URL, DATABASE_URL
    REDIS_URL, DATABASE_URL = redis_url, server_dsn


def _pool_id() -> int:
    """A fresh bigint pool id above 2**32, so the advisory key is a folded one."""
    return 2**33 + secrets.randbelow(2**62)


def _url(backend: str) -> str | None:
    return REDIS_URL if backend == "redis" else None


def _messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> int:
    """How many records of the lock module at ``level`` contain ``text``."""
    return sum(
        1
        for record in caplog.records
        if record.name == LOGGER and record.levelno == level and text in record.getMessage()
    )


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail the test after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _take(
    manager: LockManager,
    pool_id: int,
    conn: asyncpg.Connection,
    body: Callable[[], Awaitable[None]] | None = None,
) -> LockHold:
    """Run ``body`` the way the allocation path does: lock, BEGIN, enter_transaction, COMMIT."""
    async with manager.hold(pool_id) as held, conn.transaction():
        await held.enter_transaction(conn)
        if body is not None:
            await body()
    return held


@dataclass
class _Counter:
    """A shared counter whose read-modify-write loses updates unless the lock excludes."""

    value: int = 0
    inside: int = 0
    most_inside: int = 0
    backends: set[str] = field(default_factory=set)


async def _increment(
    manager: LockManager, pool_id: int, conn: asyncpg.Connection, counter: _Counter, rounds: int
) -> None:
    for _ in range(rounds):

        async def body() -> None:
            counter.inside += 1
            counter.most_inside = max(counter.most_inside, counter.inside)
            value = counter.value
            await asyncio.sleep(0.001)  # let every other task run inside the critical section
            counter.value = value + 1
            counter.inside -= 1

        held = await _take(manager, pool_id, conn, body)
        counter.backends.add(held.backend)


class _BodyError(Exception):
    """Raised by a critical section on purpose."""


async def _raise_body_error() -> None:
    raise _BodyError


@contextlib.asynccontextmanager
async def _child(script: str, *args: object) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python subprocess running ``script``; killed on exit if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *map(str, args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


@pytest.fixture(name="connect")
async def _connect() -> AsyncIterator[Connect]:
    """Opens PostgreSQL connections for the test and closes them after it."""
    conns: list[asyncpg.Connection] = []

    async def connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(DATABASE_URL)
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        await conn.close()


@pytest.fixture(name="start")
async def _start() -> AsyncIterator[Start]:
    """Starts lock managers for the test and closes them after it."""
    managers: list[LockManager] = []

    async def start(redis_url: str | None, **options: float) -> LockManager:
        manager = LockManager(redis_url, **options)
        managers.append(manager)
        await manager.start()
        return manager

    yield start
    for manager in managers:
        await manager.close()


@pytest.fixture(name="redis")
async def _redis() -> AsyncIterator[Redis]:
    """A plain client of the test Redis, to look at lock keys."""
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


# ---------------------------------------------------------------- keys and status


@pytest.mark.parametrize(
    ("pool_id", "key"),
    [
        (0, 0),
        (1, 1),
        (2**31 - 1, 2**31 - 1),
        (-(2**31), -(2**31)),
        (2**31, -(2**31)),
        (2**32 - 1, -1),
        (2**32, 1),
        (2**63 - 1, -(2**31)),
    ],
)
def test_advisory_key_maps_bigint_ids_into_int4(pool_id: int, key: int) -> None:
    """Pool ids that fit int4 are their own key; larger ids fold into int4."""
    assert advisory_key(pool_id) == (ADVISORY_NAMESPACE, key)


def test_advisory_keys_are_distinct_below_2_to_the_32() -> None:
    """Ids below 2**32 never share an advisory key (the negative int4 range takes the rest)."""
    ids = [*range(1000), *range(2**31 - 500, 2**31 + 500), *range(2**32 - 1000, 2**32)]
    assert len({advisory_key(pool_id) for pool_id in ids}) == len(ids)


@pytest.mark.parametrize("pool_id", [2**63, -(2**63) - 1])
def test_advisory_key_refuses_ids_outside_bigint(pool_id: int) -> None:
    """A pool id PostgreSQL could not store is a programming error."""
    with pytest.raises(ValueError, match="bigint"):
        advisory_key(pool_id)


async def test_without_redis_url_status_says_unset(start: Start) -> None:
    """Without a Redis URL the manager uses advisory locks and reports Redis as unset."""
    manager = await start(None)
    assert manager.backend == "advisory"
    assert manager.status() == {"backend": "advisory", "redis": "unset", "since": None}


async def test_with_redis_status_says_up(start: Start) -> None:
    """With a reachable Redis the manager uses it and reports when it came up."""
    manager = await start(REDIS_URL)
    status = manager.status()
    assert (status["backend"], status["redis"]) == ("redis", "up")
    assert isinstance(status["since"], str)
    assert datetime.fromisoformat(status["since"]).tzinfo is not None


async def test_redis_lock_is_a_pool_key_with_ttl_and_random_token(
    start: Start, connect: Connect, redis: Redis
) -> None:
    """The Redis lock is kipam:pool:{id} with the TTL as expiry and a fresh random token."""
    manager = await start(REDIS_URL, ttl_s=2.0)
    conn, pool_id = await connect(), _pool_id()
    key = f"kipam:pool:{pool_id}"
    tokens: list[bytes] = []

    async def body() -> None:
        assert 0 < await redis.pttl(key) <= 2000
        tokens.append(await redis.get(key))

    await _take(manager, pool_id, conn, body)
    await _take(manager, pool_id, conn, body)
    assert await redis.exists(key) == 0
    assert all(len(token) == 32 for token in tokens)
    assert tokens[0] != tokens[1]


# ---------------------------------------------------------------- mutual exclusion


@pytest.mark.parametrize("backend", BACKENDS)
async def test_tasks_exclude_each_other(backend: str, start: Start, connect: Connect) -> None:
    """Tasks holding one pool's lock never overlap, so no increment is lost."""
    manager = await start(_url(backend))
    pool_id, counter = _pool_id(), _Counter()
    conns = [await connect() for _ in range(6)]
    await asyncio.gather(*(_increment(manager, pool_id, conn, counter, 5) for conn in conns))
    assert counter.value == 30
    assert counter.most_inside == 1
    assert counter.backends == {backend}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_different_pools_do_not_wait_for_each_other(
    backend: str, start: Start, connect: Connect
) -> None:
    """Holding one pool's lock leaves another pool's lock free."""
    manager = await start(_url(backend), wait_s=0.5)
    first, second = await connect(), await connect()

    async def body() -> None:
        held = await _take(manager, _pool_id(), second)
        assert held.waited_s < 0.5

    await _take(manager, _pool_id(), first, body)


_CHILD_COUNTER = """
import asyncio, sys
from redis.asyncio import Redis
from redis.exceptions import RedisError
from service.locks import LockManager

async def main(redis_url, pool_id, counter_key, rounds):
    manager = LockManager(redis_url, wait_s=20)
    await manager.start()
    client = Redis.from_url(redis_url)
    try:
        print(manager.backend, flush=True)
        sys.stdin.readline()  # start line: both processes contend from the first round
        for _ in range(rounds):
            async with manager.hold(pool_id):
                value = int(await client.get(counter_key) or 0)
                await asyncio.sleep(0.001)
                await client.set(counter_key, value + 1)
    finally:
        await client.aclose()
        await manager.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
"""


async def test_processes_exclude_each_other_through_redis(redis: Redis) -> None:
    """Two OS processes incrementing one Redis counter under the pool lock lose no update."""
    pool_id, rounds = _pool_id(), 40
    counter_key = f"kipam:test:counter:{pool_id}"
    try:
        async with (
            _child(_CHILD_COUNTER, REDIS_URL, pool_id, counter_key, rounds) as one,
            _child(_CHILD_COUNTER, REDIS_URL, pool_id, counter_key, rounds) as two,
        ):
            for proc in (one, two):
                assert proc.stdout is not None
                assert await asyncio.wait_for(proc.stdout.readline(), DEADLINE_S) == b"redis\n"
            for proc in (one, two):
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            for proc in (one, two):
                _, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
                assert proc.returncode == 0, stderr.decode()
        assert int(await redis.get(counter_key)) == 2 * rounds
    finally:
        await redis.delete(counter_key)


# ---------------------------------------------------------------- bounded waits


async def test_redis_wait_is_bounded(start: Start, connect: Connect) -> None:
    """A Redis lock held elsewhere for longer than wait_s ends in LockTimeoutError."""
    holder = await start(REDIS_URL)
    waiter = await start(REDIS_URL, wait_s=0.3)
    pool_id, conn = _pool_id(), await connect()
    async with holder.hold(pool_id):
        began = time.monotonic()
        with pytest.raises(LockTimeoutError, match="not granted"):
            await _take(waiter, pool_id, conn)
        elapsed = time.monotonic() - began
    assert 0.25 <= elapsed < 2.0
    assert not conn.is_in_transaction()


async def test_advisory_wait_is_bounded(start: Start, connect: Connect) -> None:
    """An advisory lock held by another transaction ends in LockTimeoutError after wait_s."""
    manager = await start(None, wait_s=0.3)
    pool_id, other, conn = _pool_id(), await connect(), await connect()
    async with other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock($1, $2)", *advisory_key(pool_id))
        began = time.monotonic()
        with pytest.raises(LockTimeoutError, match="not granted"):
            await _take(manager, pool_id, conn)
        elapsed = time.monotonic() - began
    assert 0.25 <= elapsed < 2.0
    assert not conn.is_in_transaction()
    assert (await _take(manager, pool_id, conn)).backend == "advisory"  # free once other ends


async def test_advisory_lock_lasts_until_the_transaction_ends(
    start: Start, connect: Connect
) -> None:
    """The advisory lock is held from enter_transaction to COMMIT, and lock_timeout is restored."""
    manager = await start(None)
    pool_id, other, conn = _pool_id(), await connect(), await connect()
    before = await conn.fetchval("SHOW lock_timeout")
    try_lock = "SELECT pg_try_advisory_xact_lock($1, $2)"

    async def body() -> None:
        assert await other.fetchval(try_lock, *advisory_key(pool_id)) is False
        assert await conn.fetchval("SHOW lock_timeout") == before

    held = await _take(manager, pool_id, conn, body)
    assert held.backend == "advisory"
    assert await other.fetchval(try_lock, *advisory_key(pool_id)) is True


async def test_advisory_lock_works_on_a_pooled_connection(start: Start, connect: Connect) -> None:
    """A connection lent by an asyncpg pool takes and ends the advisory lock like a plain one."""
    manager = await start(None)
    pool_id, other = _pool_id(), await connect()
    try_lock = "SELECT pg_try_advisory_xact_lock($1, $2)"
    async with (
        asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=1) as pool,
        manager.hold(pool_id) as held,
        pool.acquire() as conn,
        conn.transaction(),
    ):
        await held.enter_transaction(conn)
        assert await other.fetchval(try_lock, *advisory_key(pool_id)) is False
    assert await other.fetchval(try_lock, *advisory_key(pool_id)) is True


async def test_enter_transaction_needs_a_transaction(start: Start, connect: Connect) -> None:
    """Entering outside a transaction is refused: the lock would end with the statement."""
    manager = await start(None)
    conn = await connect()
    async with manager.hold(_pool_id()) as held:
        with pytest.raises(RuntimeError, match="transaction"):
            await held.enter_transaction(conn)


# ---------------------------------------------------------------- release


_CHILD_HOLDER = """
import asyncio, sys
from service.locks import LockManager

async def main(redis_url, pool_id):
    manager = LockManager(redis_url, ttl_s=0.5)
    await manager.start()
    async with manager.hold(pool_id) as held:
        print(held.backend, flush=True)
        await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_lock_of_a_killed_holder_expires_after_its_ttl(
    start: Start, connect: Connect, redis: Redis
) -> None:
    """A holder SIGKILLed inside its critical section never releases; the TTL frees the lock."""
    pool_id, conn = _pool_id(), await connect()
    async with _child(_CHILD_HOLDER, REDIS_URL, pool_id) as proc:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), DEADLINE_S) == b"redis\n"
        assert 0 < await redis.pttl(f"kipam:pool:{pool_id}") <= 500
        proc.kill()
        await proc.wait()
    manager = await start(REDIS_URL, ttl_s=0.5, wait_s=3.0)
    held = await _take(manager, pool_id, conn)
    assert held.backend == "redis"
    assert held.waited_s < 3.0


async def test_release_after_ttl_expiry_does_not_raise(
    start: Start, connect: Connect, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A holder outliving its TTL releases without raising and leaves the next holder's lock."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    first = await start(REDIS_URL, ttl_s=0.2)
    second = await start(REDIS_URL)
    pool_id, conn = _pool_id(), await connect()
    key = f"kipam:pool:{pool_id}"

    async def expired() -> bool:
        return await redis.exists(key) == 0

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(first.hold(pool_id))
        await _until(expired, "the first lock to expire")

        async def body() -> None:
            await stack.aclose()  # the first holder leaves after its TTL
            assert await redis.exists(key) == 1  # the compare-and-delete spared the second

        await _take(second, pool_id, conn, body)
    assert await redis.exists(key) == 0
    assert _messages(caplog, logging.WARNING, "expired before its release") == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_exception_in_body_releases_the_lock(
    backend: str, start: Start, connect: Connect
) -> None:
    """An exception leaving the body releases the lock, so another holder gets it at once."""
    manager = await start(_url(backend), wait_s=0.3)
    pool_id, conn, other = _pool_id(), await connect(), await connect()
    with pytest.raises(_BodyError):
        await _take(manager, pool_id, conn, _raise_body_error)
    assert not conn.is_in_transaction()
    held = await _take(manager, pool_id, other)  # LockTimeoutError if the lock were still held
    assert held.backend == backend


# ---------------------------------------------------------------- fallback and recovery


async def test_unreachable_redis_falls_back_to_advisory_locks(
    start: Start, connect: Connect, caplog: pytest.LogCaptureFixture, free_port: Callable[[], int]
) -> None:
    """With Redis refusing connections, advisory locks exclude and one warning is logged."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    manager = await start(f"redis://127.0.0.1:{free_port()}/0", retry_s=0.01)
    status = manager.status()
    assert (status["backend"], status["redis"]) == ("advisory", "down")
    assert isinstance(status["since"], str)

    pool_id, counter = _pool_id(), _Counter()
    conns = [await connect() for _ in range(4)]
    await asyncio.gather(*(_increment(manager, pool_id, conn, counter, 5) for conn in conns))
    assert (counter.value, counter.most_inside, counter.backends) == (20, 1, {"advisory"})

    async def probed() -> bool:
        await _take(manager, pool_id, conns[0])
        return _messages(caplog, logging.DEBUG, "redis still unreachable") >= 2

    await _until(probed, "Redis to be tried again")
    assert _messages(caplog, logging.WARNING, FALLBACK) == 1
    assert manager.status() == status


async def test_probes_are_spaced_by_retry_s(
    start: Start, connect: Connect, caplog: pytest.LogCaptureFixture, free_port: Callable[[], int]
) -> None:
    """While Redis is down, acquisitions within retry_s do not try it again."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    manager = await start(f"redis://127.0.0.1:{free_port()}/0", retry_s=60.0)
    conn = await connect()
    for _ in range(5):
        assert (await _take(manager, _pool_id(), conn)).backend == "advisory"
    assert _messages(caplog, logging.WARNING, FALLBACK) == 1
    assert _messages(caplog, logging.DEBUG, "redis still unreachable") == 0


async def test_goes_back_to_redis_and_falls_back_again(
    start: Start,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
    start_redis: Callable[[int], subprocess.Popen[bytes]],
    free_port: Callable[[], int],
) -> None:
    """When Redis comes up the manager returns to it (info once); when it dies, falls back again."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = free_port()
    manager = await start(f"redis://127.0.0.1:{port}/0", retry_s=0.05)
    pool_id, conn = _pool_id(), await connect()
    assert (await _take(manager, pool_id, conn)).backend == "advisory"
    down_since = manager.status()["since"]

    redis_proc = start_redis(port)
    try:

        async def on_redis() -> bool:
            return (await _take(manager, pool_id, conn)).backend == "redis"

        await _until(on_redis, "the manager to go back to Redis")
        status = manager.status()
        assert (status["backend"], status["redis"]) == ("redis", "up")
        assert isinstance(status["since"], str)
        assert isinstance(down_since, str)
        assert datetime.fromisoformat(status["since"]) > datetime.fromisoformat(down_since)
        for _ in range(3):
            assert (await _take(manager, pool_id, conn)).backend == "redis"
        assert _messages(caplog, logging.INFO, BACK) == 1
        assert _messages(caplog, logging.WARNING, FALLBACK) == 1
    finally:
        redis_proc.kill()
        redis_proc.wait(10)

    held = await _take(manager, pool_id, conn)  # the server is gone: refused, then advisory
    assert held.backend == "advisory"
    assert manager.status()["redis"] == "down"
    assert _messages(caplog, logging.WARNING, FALLBACK) == 2


# -- several pools at once (one batch transaction) ------------------------------------------


async def _take_many(
    manager: LockManager, pool_ids: list[int], conn: asyncpg.Connection, hold_s: float = 0.0
) -> list[LockHold]:
    """Hold several pools' locks the way a lane's transaction does, for ``hold_s``."""
    async with manager.hold_many(pool_ids) as holds:
        await begin_with_locks(conn, holds)
        try:
            await asyncio.sleep(hold_s)
        finally:
            await conn.execute("COMMIT")
    return holds


@pytest.mark.parametrize("backend", BACKENDS)
async def test_batched_locks_exclude_single_and_overlapping_batches(
    backend: str, start: Start, connect: Connect
) -> None:
    """A batch holding pools a and b excludes a single hold of b and a batch of b and c."""
    a, b, c = sorted(_pool_id() for _ in range(3))
    holder = await start(_url(backend))
    waiter = await start(_url(backend), wait_s=0.1)
    conn_1, conn_2 = await connect(), await connect()
    task = asyncio.create_task(_take_many(holder, [a, b], conn_1, hold_s=1.0))
    await asyncio.sleep(0.2)  # let the batch take its locks
    with pytest.raises(LockTimeoutError):
        await _take(waiter, b, conn_2)
    if conn_2.is_in_transaction():
        await conn_2.execute("ROLLBACK")
    with pytest.raises(LockTimeoutError):
        await _take_many(waiter, [b, c], conn_2)
    if conn_2.is_in_transaction():
        await conn_2.execute("ROLLBACK")
    holds = await task
    assert [h.backend for h in holds] == [backend, backend]
    assert [h.pool_id for h in holds] == [a, b]
    assert (await _take_many(waiter, [b, c], conn_2))[0].pool_id == b


async def test_batched_redis_locks_are_released_together(
    start: Start, connect: Connect, redis: Redis
) -> None:
    """After a batch, none of its Redis keys is left behind."""
    manager = await start(REDIS_URL)
    pools = [_pool_id() for _ in range(5)]
    holds = await _take_many(manager, pools, await connect())
    assert {h.backend for h in holds} == {"redis"}
    assert await redis.exists(*(f"kipam:pool:{p}" for p in pools)) == 0


async def test_batched_locks_fall_back_when_redis_is_unreachable(
    start: Start, connect: Connect, free_port: Callable[[], int]
) -> None:
    """With Redis down, a batch is served with advisory locks."""
    manager = await start(f"redis://127.0.0.1:{free_port()}/0")
    holds = await _take_many(manager, [_pool_id(), _pool_id()], await connect())
    assert {h.backend for h in holds} == {"advisory"}
