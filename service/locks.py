"""Per-pool locks across replicas: a Redis lock, or a PostgreSQL advisory lock without Redis.

Theory of operation (DESIGN.md, "One allocation, end to end", step 2):

- The lock only cuts contention. Correctness never depends on it: the pool row is locked
  ``FOR UPDATE`` (its generation is the fencing token) and the exclusion constraints hold even
  when a Redis lock expires in the middle of a transaction. So every failure mode here ends in
  "less exclusion for a while", never in a wrong allocation.
- Callers queue requests per pool in-process, so at most one lock request per pool and process
  is in flight. Contenders are therefore one per replica, and waiting on Redis polls every
  5 ms (``_SLEEP_S``), not every few hundred microseconds: a naive spin collapses a hot pool to
  about 30 allocations/s (research/limits.md, row 7b).
- The Redis lock is taken **before** the caller takes a database connection, so a request
  waiting for a busy pool holds no connection. The advisory lock necessarily waits on the
  connection, inside the caller's transaction, and is released by COMMIT, ROLLBACK or a dropped
  connection; ``lock_timeout`` bounds that wait and is restored to the session default after
  the lock is granted, so it does not leak into the rest of the transaction.
- Backends: Redis when a URL is configured and it answers; PostgreSQL advisory locks when no URL
  is configured or Redis does not answer. An unreachable Redis is logged once at warning, the
  acquisition is served by the advisory backend, and Redis is tried again (by one acquisition,
  a probe) no more often than every ``retry_s``. When a probe gets an answer the manager logs
  once at info and goes back to Redis. While replicas disagree about the backend they do not
  exclude each other; the row lock still serializes them.

Usage, by the allocation path (one transaction for the requests of several pools)::

    async with locks.hold_many(pool_ids) as holds:   # Redis wait: no connection held yet
        async with db.connection() as conn:
            await begin_with_locks(conn, holds)      # BEGIN + advisory locks (none for Redis)
            ...                                      # SELECT pools FOR UPDATE; ...; COMMIT
                                                     # Redis locks released on exit

``hold(pool_id)`` with ``LockHold.enter_transaction`` is the same for one pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
import urllib.parse
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.errors import DatabaseUnavailableError, LockTimeoutError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from asyncpg.pool import PoolConnectionProxy

    # What enter_transaction accepts: a plain connection or one lent by an asyncpg pool.
    Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

__all__ = [
    "ADVISORY_NAMESPACE",
    "Backend",
    "LockHold",
    "LockManager",
    "RedisState",
    "advisory_key",
    "begin_with_locks",
]

logger = logging.getLogger(__name__)

Backend = Literal["redis", "advisory"]
"""Which lock serves an acquisition."""

RedisState = Literal["unset", "up", "down"]
"""Redis as the health endpoint reports it: not configured, answering, or not answering."""

# First key of the two-int4 form pg_advisory_xact_lock(namespace, pool key): "kipa" in ASCII.
# The two-int4 form is a key space of its own (pg_locks.objsubid = 2), apart from the one-bigint
# form that service/migrate.py uses, so neither can collide with the other.
ADVISORY_NAMESPACE: Final = 0x6B697061

# Pause between tries while another replica holds a pool's Redis lock. Contenders are one per
# replica (callers queue per pool in-process), so 5 ms costs a handoff 2.5 ms on average and a
# few hundred SET NX per second per hot pool at most; polling every 0.2 ms instead collapsed a
# hot pool to about 30 allocations/s (research/limits.md, row 7b).
_SLEEP_S: Final = 0.005

# Connect and read timeout of every Redis call: the most a blackholed Redis delays an
# acquisition before it falls back. A healthy Redis answers in well under a millisecond (3a).
_SOCKET_TIMEOUT_S: Final = 1.0

_INT4_MIN: Final = -(2**31)
_INT4_MAX: Final = 2**31 - 1
_INT8_MIN: Final = -(2**63)
_INT8_MAX: Final = 2**63 - 1

# Errors that mean "Redis did not answer usefully": refused, reset, timed out, protocol garbage,
# or a server refusing writes. All of them send the acquisition to the advisory backend.
_REDIS_DOWN: Final = (RedisError, OSError)
# The locks of all the pools a transaction touches, in one round trip, all or none (a Lua
# script runs atomically): key kipam:pool:<id>, value a random token, expiry ttl_s. Released
# together by a compare-and-delete on the token, so a lock that expired and was taken by
# another replica is never deleted by its former holder. A hot pool alone is the same call
# with one key.
_ACQUIRE_MANY: Final = """
for _, key in ipairs(KEYS) do
    if redis.call('exists', key) == 1 then return 0 end
end
for _, key in ipairs(KEYS) do
    redis.call('set', key, ARGV[1], 'PX', ARGV[2])
end
return 1
"""
_RELEASE_MANY: Final = """
local released = 0
for _, key in ipairs(KEYS) do
    if redis.call('get', key) == ARGV[1] then
        redis.call('del', key)
        released = released + 1
    end
end
return released
"""

# SQLSTATEs that mean the advisory lock was not granted: lock_timeout (55P03), a statement
# timeout or cancel (57014), and a deadlock between pools locked in different orders (40P01).
_NOT_GRANTED: Final = (
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def advisory_key(pool_id: int) -> tuple[int, int]:
    """The two int4 keys of a pool's advisory lock: ``(ADVISORY_NAMESPACE, pool key)``.

    Pool ids are bigint. Ids that fit in int4 are their own key. Larger ids are folded: ids
    below 2**32 map to the negative int4 range (unused by identity columns), so every id below
    2**32 has a key of its own; ids from 2**32 up fold their two 32-bit halves with XOR and may
    share a key with another pool. Two pools sharing a key only wait for each other, they
    never break an invariant (the lock only cuts contention).

    Raises:
        ValueError: ``pool_id`` is outside the bigint range.
    """
    if not _INT8_MIN <= pool_id <= _INT8_MAX:
        raise ValueError(f"pool id {pool_id} is outside the bigint range")
    if _INT4_MIN <= pool_id <= _INT4_MAX:
        return ADVISORY_NAMESPACE, pool_id
    unsigned = pool_id & 0xFFFF_FFFF_FFFF_FFFF
    folded = (unsigned ^ (unsigned >> 32)) & 0xFFFF_FFFF
    return ADVISORY_NAMESPACE, folded - 2**32 if folded > _INT4_MAX else folded


class LockHold:
    """A pool lock held for the body of :meth:`LockManager.hold`.

    Attributes:
        pool_id: The pool whose lock this is.
        backend: ``"redis"`` (held since the body began) or ``"advisory"`` (taken by
            :meth:`enter_transaction`).
        waited_s: Seconds spent waiting for the lock: the Redis wait (including a failed Redis
            attempt before falling back), plus the advisory wait once :meth:`enter_transaction`
            has run.
    """

    __slots__ = ("_advisory_wait_s", "_entered", "backend", "pool_id", "waited_s")

    def __init__(
        self, pool_id: int, backend: Backend, *, waited_s: float, advisory_wait_s: float
    ) -> None:
        self.pool_id = pool_id
        self.backend: Backend = backend
        self.waited_s = waited_s
        # What is left of the manager's wait budget for the advisory lock's lock_timeout.
        self._advisory_wait_s = advisory_wait_s
        self._entered = False

    def __repr__(self) -> str:
        return f"LockHold(pool_id={self.pool_id}, backend={self.backend!r})"

    async def enter_transaction(self, conn: Connection) -> None:
        """Take the advisory lock in ``conn``'s transaction; call it right after BEGIN.

        For the Redis backend this does nothing (the lock is already held). For the advisory
        backend it runs ``SET LOCAL lock_timeout``, ``pg_advisory_xact_lock(namespace, key)``
        and restores ``lock_timeout`` to the session default, in one round trip; the lock is
        released when the transaction ends. Calling it again in the same hold does nothing.

        Args:
            conn: The connection whose transaction the body runs; it must be in a transaction.

        Raises:
            RuntimeError: ``conn`` is not in a transaction (the lock would end with the
                statement), whatever the backend.
            LockTimeoutError: the advisory lock was not granted within the wait budget. The
                transaction is aborted; the caller rolls it back.
            DatabaseUnavailableError: the connection broke or the database refused the query.
        """
        if not conn.is_in_transaction():
            raise RuntimeError("enter_transaction() needs a connection inside a transaction")
        if self.backend == "advisory" and not self._entered:
            await _take_advisory(conn, [self], begin=False)


async def begin_with_locks(conn: Connection, holds: Sequence[LockHold]) -> None:
    """``BEGIN`` and every advisory lock of ``holds``, in one round trip.

    Advisory locks are taken in key order (as every replica does), so two transactions that
    lock overlapping sets of pools never deadlock. Redis holds need nothing here. The caller
    ends the transaction (COMMIT or ROLLBACK), which releases the advisory locks.

    Raises:
        RuntimeError: ``conn`` is already in a transaction.
        LockTimeoutError: a lock was not granted within the smallest wait budget; the
            transaction is open and aborted: the caller rolls it back.
        DatabaseUnavailableError: the connection broke or the database refused the query.
    """
    if conn.is_in_transaction():
        raise RuntimeError("begin_with_locks() starts the transaction itself")
    pending = [h for h in holds if h.backend == "advisory" and not h._entered]  # noqa: SLF001
    if not pending:
        try:
            await conn.execute("BEGIN")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise DatabaseUnavailableError(f"PostgreSQL failed at BEGIN: {exc}") from exc
        return
    await _take_advisory(conn, pending, begin=True)


async def _take_advisory(conn: Connection, holds: Sequence[LockHold], *, begin: bool) -> None:
    """Take the holds' advisory locks (after ``BEGIN`` if ``begin``) in one round trip.

    Keys in order, as every replica takes them; ``lock_timeout`` is the smallest wait budget
    left (never 0, which would mean "wait forever") and is restored to the session default
    after the locks are granted, so it does not leak into the rest of the transaction.
    """
    keys = sorted({advisory_key(h.pool_id) for h in holds})
    budget = min(h._advisory_wait_s for h in holds)  # noqa: SLF001
    timeout_ms = max(1, math.ceil(budget * 1000))
    # Integers formatted by us, never input: one simple-protocol round trip.
    sql = (
        ("BEGIN; " if begin else "")
        + f"SET LOCAL lock_timeout = '{timeout_ms}ms'; "
        + "".join(f"SELECT pg_advisory_xact_lock({ns}, {key}); " for ns, key in keys)
        + "SET LOCAL lock_timeout TO DEFAULT"
    )
    pools = ", ".join(str(h.pool_id) for h in holds)
    started = time.monotonic()
    try:
        await conn.execute(sql)
    except _NOT_GRANTED as exc:
        raise LockTimeoutError(
            f"The lock of pool(s) {pools} was not granted within {timeout_ms} ms "
            "(PostgreSQL advisory lock); try again."
        ) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise DatabaseUnavailableError(
            f"PostgreSQL failed while locking pool(s) {pools}: {exc}"
        ) from exc
    finally:
        waited = time.monotonic() - started
        for hold in holds:
            hold.waited_s += waited
    for hold in holds:
        hold._entered = True  # noqa: SLF001


SENTINEL_SCHEME: Final = "redis+sentinel"


def redis_client(url: str) -> tuple[Redis, list[Redis]]:
    """A client for ``url``: ``redis://``, ``rediss://``, ``unix://``, or Redis Sentinel.

    A Sentinel URL names the sentinels, the monitored master's service name and optionally
    the database: ``redis+sentinel://[[user]:password@]host:26379[,host:26379...]/mymaster[/db]``
    (IPv6 hosts in brackets). The password is the master's; ``?sentinel_password=`` gives the
    sentinels' own. The client asks the sentinels for the master on every new connection, so
    after a failover it follows the new master (redis-py's ``Sentinel.master_for``).

    Returns:
        The client, and the clients of the sentinels it asks (to be closed with it).

    Raises:
        ValueError: the URL cannot be parsed.
    """
    options: dict[str, Any] = {
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "socket_connect_timeout": _SOCKET_TIMEOUT_S,
        # No retries inside redis-py: its default (10 tries with backoff) would turn one
        # unreachable Redis into seconds of waiting; falling back is our retry policy.
        "retry": Retry(NoBackoff(), 0),
    }
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return Redis.from_url(url, **options), []
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or not parts.netloc.rpartition("@")[2]:
        raise ValueError(
            f"a Sentinel URL is {SENTINEL_SCHEME}://host:port[,host:port...]/service[/db], "
            f"not {url!r}"
        )
    sentinels = [_host_port(h) for h in parts.netloc.rpartition("@")[2].split(",")]
    query = urllib.parse.parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    sentinel = Sentinel(  # type: ignore[no-untyped-call] # redis-py leaves it unannotated
        sentinels,
        sentinel_kwargs={
            "password": sentinel_password,
            "socket_timeout": _SOCKET_TIMEOUT_S,
            "socket_connect_timeout": _SOCKET_TIMEOUT_S,
        },
    )
    master: Redis = sentinel.master_for(
        path[0],
        redis_class=Redis,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password else None,
        db=int(path[1]) if len(path) > 1 else 0,
        **options,
    )
    return master, list(sentinel.sentinels)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a sentinel address is host:port, not {text!r}")
    return host.strip("[]"), int(port)


class LockManager:
    """Per-pool locks for every replica: Redis when configured and answering, else advisory.

    One manager per process, started once and closed at shutdown. Not thread-safe; all calls
    come from one event loop.

    Args:
        redis_url: Redis URL (``KIPAM_REDIS_URL``); None uses PostgreSQL advisory locks only.
        ttl_s: Lifetime of a Redis lock whose holder died; the body must finish well within it.
        wait_s: Most seconds an acquisition waits before ``LockTimeoutError``.
        retry_s: After Redis failed, the least time before an acquisition tries it again.
        key_prefix: Redis key of a pool's lock is ``key_prefix + str(pool_id)``.
    """

    def __init__(
        self,
        redis_url: str | None,
        *,
        ttl_s: float = 10.0,
        wait_s: float = 5.0,
        retry_s: float = 5.0,
        key_prefix: str = "kipam:pool:",
    ) -> None:
        if ttl_s < 0.001:
            raise ValueError("ttl_s must be at least 0.001 (Redis expiries are milliseconds)")
        if wait_s < 0 or retry_s < 0:
            raise ValueError("wait_s and retry_s must not be negative")
        self._redis_url = redis_url
        self._ttl_s = ttl_s
        self._wait_s = wait_s
        self._retry_s = retry_s
        self._key_prefix = key_prefix
        self._redis: Redis | None = None
        self._sentinels: list[Redis] = []  # a Sentinel URL's sentinels, closed with it
        self._state: RedisState = "unset" if redis_url is None else "down"
        # Wall-clock time of the last state change, for /readyz; None until start().
        self._since: datetime | None = None
        # Monotonic time before which no acquisition tries a Redis that is down.
        self._next_probe_at = -math.inf

    async def start(self) -> None:
        """Connect to Redis, if configured; an unreachable Redis is not fatal (advisory locks).

        Raises:
            ValueError: the Redis URL cannot be parsed.
        """
        if self._redis_url is None or self._redis is not None:
            return
        self._redis, self._sentinels = redis_client(self._redis_url)
        try:
            await self._redis.ping()
        except _REDIS_DOWN as exc:
            self._redis_failed(exc)
        else:
            self._redis_answered()

    async def close(self) -> None:
        """Close the Redis connections; locks still held expire after their TTL."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()
        sentinels, self._sentinels = self._sentinels, []
        for sentinel in sentinels:
            await sentinel.aclose()

    @property
    def backend(self) -> Backend:
        """The backend the next acquisition uses (a due probe may still switch it to Redis)."""
        return "redis" if self._state == "up" else "advisory"

    def status(self) -> dict[str, object]:
        """The lock backend for the health endpoint.

        Returns:
            ``{"backend": "redis"|"advisory", "redis": "unset"|"up"|"down", "since": ...}``,
            where ``since`` is the ISO 8601 UTC time of the last change, or None before any.
        """
        since = None if self._since is None else self._since.isoformat()
        return {"backend": self.backend, "redis": self._state, "since": since}

    @contextlib.asynccontextmanager
    async def hold(self, pool_id: int) -> AsyncIterator[LockHold]:
        """Hold the pool's lock for the body; acquire the body's database connection inside it.

        With Redis the lock is held when the body starts and released (compare-and-delete on
        the token) when it ends, also on an exception. With the advisory backend the body must
        BEGIN and call :meth:`LockHold.enter_transaction` right away; the lock then ends with
        the transaction. Call ``enter_transaction`` for every backend: the body need not know
        which one it got.

        A release after the TTL expired is logged at warning and does not raise: the body's
        transaction has already committed or rolled back.

        Args:
            pool_id: The pool's id (bigint).

        Yields:
            The held lock, with its backend and the time waited.

        Raises:
            LockTimeoutError: Redis answered but the lock was not granted within ``wait_s``.
            RuntimeError: Redis is configured but :meth:`start` has not run.
            ValueError: ``pool_id`` is outside the bigint range.
        """
        async with self.hold_many([pool_id]) as [held]:
            yield held

    @contextlib.asynccontextmanager
    async def hold_many(self, pool_ids: Sequence[int]) -> AsyncIterator[list[LockHold]]:
        """:meth:`hold` for several pools at once, as one batch transaction needs them.

        With Redis, all the pools' locks are taken together in one atomic script (all or none,
        retried every few milliseconds within ``wait_s``) and released together: one round
        trip per try instead of one per pool, and no partial holds to deadlock on. With the
        advisory backend the locks are taken by :func:`begin_with_locks`.

        Yields:
            One hold per pool, in the order given.

        Raises:
            LockTimeoutError: Redis answered but the locks were not all free within ``wait_s``.
            RuntimeError: Redis is configured but :meth:`start` has not run.
            ValueError: a pool id is outside the bigint range.
        """
        for pool_id in pool_ids:
            advisory_key(pool_id)
        if self._redis_url is not None and self._redis is None:
            raise RuntimeError("LockManager.start() must run before hold_many()")
        started = time.monotonic()
        token = await self._acquire_many(pool_ids) if self._should_try_redis() else None
        waited_s = time.monotonic() - started
        if token is None:
            left = max(self._wait_s - waited_s, 0.0)
            yield [
                LockHold(p, "advisory", waited_s=waited_s, advisory_wait_s=left) for p in pool_ids
            ]
            return
        try:
            yield [LockHold(p, "redis", waited_s=waited_s, advisory_wait_s=0.0) for p in pool_ids]
        finally:
            await self._release_many(pool_ids, token)

    async def _acquire_many(self, pool_ids: Sequence[int]) -> str | None:
        """Take every pool's Redis lock at once; the token, or None when Redis did not answer.

        Raises:
            LockTimeoutError: Redis answered but some lock stayed taken for ``wait_s``.
        """
        redis = self._redis
        if redis is None:  # closed while this acquisition was being scheduled
            return None
        probing = self._state != "up"
        keys = [f"{self._key_prefix}{p}" for p in pool_ids]
        token = secrets.token_hex(16)
        ttl_ms = max(1, round(self._ttl_s * 1000))
        deadline = time.monotonic() + self._wait_s
        try:
            while not await redis.eval(_ACQUIRE_MANY, len(keys), *keys, token, ttl_ms):
                if probing:
                    self._redis_answered()
                    probing = False
                if time.monotonic() >= deadline:
                    pools = ", ".join(str(p) for p in pool_ids)
                    raise LockTimeoutError(
                        f"The lock of pool(s) {pools} was not granted within "
                        f"{self._wait_s:g} s (Redis lock); try again."
                    )
                await asyncio.sleep(_SLEEP_S)
        except _REDIS_DOWN as exc:
            self._redis_failed(exc)
            return None
        if probing:
            self._redis_answered()
        return token

    async def _release_many(self, pool_ids: Sequence[int], token: str) -> None:
        """Release what is still ours; never raise to the body's caller."""
        redis = self._redis
        if redis is None:
            return
        keys = [f"{self._key_prefix}{p}" for p in pool_ids]
        try:
            released = await redis.eval(_RELEASE_MANY, len(keys), *keys, token)
        except _REDIS_DOWN as exc:
            logger.warning(
                "could not release the redis locks of pools %s (%s); they expire after %g s",
                pool_ids,
                exc,
                self._ttl_s,
            )
            self._redis_failed(exc)
            return
        if int(released) < len(keys):
            logger.warning(
                "%d redis lock(s) of pool(s) %s expired before its release (held longer than "
                "the %g s TTL); another replica may have held them meanwhile",
                len(keys) - int(released),
                ", ".join(str(p) for p in pool_ids),
                self._ttl_s,
            )

    def _should_try_redis(self) -> bool:
        """Whether this acquisition uses Redis; claims the probe slot when one is due."""
        if self._redis is None:
            return False
        if self._state == "up":
            return True
        now = time.monotonic()
        if now < self._next_probe_at:
            return False
        # This acquisition is the probe; concurrent ones keep to the advisory backend.
        self._next_probe_at = now + self._retry_s
        return True

    def _redis_failed(self, exc: BaseException) -> None:
        """Record that Redis did not answer; warn on the change to down, once."""
        self._next_probe_at = time.monotonic() + self._retry_s
        if self._state == "down" and self._since is not None:
            logger.debug("redis still unreachable: %s", exc)
            return
        self._state, self._since = "down", datetime.now(UTC)
        logger.warning(
            "redis unreachable, falling back to PostgreSQL advisory locks (%s: %s); "
            "retrying every %g s",
            type(exc).__name__,
            exc,
            self._retry_s,
        )

    def _redis_answered(self) -> None:
        """Record that Redis answered; log once when it comes back."""
        if self._state == "up":
            return
        came_back = self._since is not None
        self._state, self._since = "up", datetime.now(UTC)
        if came_back:
            logger.info("redis reachable again, back to redis locks")
