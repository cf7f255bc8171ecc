"""PostgreSQL access: the connection pool, row conversion, and driver errors translated.

Every SQL statement of the service lives here or in :mod:`service.usecases`' write path,
and every asyncpg error leaves this module as one of :mod:`service.errors` (``raise ... from
exc``), so the transports never see a driver exception.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import TYPE_CHECKING, Any, Final, cast

import asyncpg

from engine import Prefix, parse_prefix
from service.errors import (
    AlreadyExistsError,
    DatabaseUnavailableError,
    InvalidRequestError,
    LockTimeoutError,
    PreconditionFailedError,
    ReferenceNotFoundError,
    ServiceError,
)
from service.models import Allocation, Change, Pool, PoolPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from service.config import Settings

__all__ = [
    "ALLOCATION_COLUMNS",
    "CHANGE_COLUMNS",
    "POOL_COLUMNS",
    "Database",
    "allocation_from_row",
    "change_from_row",
    "pool_from_row",
    "prefix_from_db",
    "translate",
]

POOL_COLUMNS: Final = """
    p.id, p.name, p.cidr, s.name AS space, p.role, pp.name AS parent, p.policy, p.labels,
    p.generation, p.revision, p.created_at
"""
CHANGE_COLUMNS: Final = """
    c.revision, c.kind, c.at, c.pool_name, c.allocation_id, c.prefix, c.owner, c.actor,
    c.request_id, c.trace_id
"""
ALLOCATION_COLUMNS: Final = """
    a.id, p.name AS pool, a.prefix, a.owner, a.labels, a.state, a.created_at, a.released_at,
    a.reusable_at, a.revision, a.idempotency_key
"""
# PostgreSQL's DETAIL names the row already there: "... conflicts with existing key
# (pool_id, prefix)=(<pool id>, <prefix>)."; the prefix is the conflict to report.
_EXISTING_KEY: Final = re.compile(r"existing key \([^)]*\)=\((?:[^,]*, )?([^)]+)\)")
_UNAVAILABLE: Final = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    # The protocol's own state errors, seen when a connection dies mid-operation.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def prefix_from_db(value: object) -> Prefix:
    """A ``cidr`` column value: connections of :class:`Database` decode ``cidr`` to prefixes."""
    if not isinstance(value, Prefix):  # pragma: no cover - a connection without our codec
        raise TypeError(f"expected a Prefix from the cidr codec, got {type(value).__name__}")
    return value


def pool_from_row(row: asyncpg.Record) -> Pool:
    """A row selected with :data:`POOL_COLUMNS`."""
    return Pool(
        id=row["id"],
        name=row["name"],
        cidr=prefix_from_db(row["cidr"]),
        space=row["space"],
        role=row["role"],
        parent=row["parent"],
        policy=PoolPolicy.from_json(row["policy"]),
        labels=row["labels"],
        generation=row["generation"],
        revision=row["revision"],
        created_at=row["created_at"],
    )


def allocation_from_row(row: asyncpg.Record) -> Allocation:
    """A row selected with :data:`ALLOCATION_COLUMNS`."""
    return Allocation(
        id=row["id"],
        pool=row["pool"],
        prefix=prefix_from_db(row["prefix"]),
        owner=row["owner"],
        labels=row["labels"],
        state=row["state"],
        created_at=row["created_at"],
        released_at=row["released_at"],
        reusable_at=row["reusable_at"],
        revision=row["revision"],
        idempotency_key=row["idempotency_key"],
    )


def change_from_row(row: asyncpg.Record) -> Change:
    """A row selected with :data:`CHANGE_COLUMNS`."""
    return Change(
        revision=row["revision"],
        kind=row["kind"],
        at=row["at"],
        pool=row["pool_name"],
        allocation_id=row["allocation_id"],
        prefix=prefix_from_db(row["prefix"]) if row["prefix"] is not None else None,
        owner=row["owner"],
        actor=row["actor"],
        request_id=row["request_id"],
        trace_id=row["trace_id"],
    )


def _constraint(exc: asyncpg.PostgresError) -> str:
    return str(getattr(exc, "constraint_name", None) or "")


def _exclusion(exc: asyncpg.exceptions.ExclusionViolationError) -> ServiceError:
    match = _EXISTING_KEY.search(str(getattr(exc, "detail", None) or ""))
    conflicts = (match.group(1),) if match else ()
    found = f": {conflicts[0]}." if conflicts else "."
    if _constraint(exc) == "pools_root_overlap":
        return AlreadyExistsError(
            "The pool overlaps another root pool of its space" + found, conflicts=conflicts
        )
    if _constraint(exc) == "allocations_reserved":
        return AlreadyExistsError(f"{str(exc).capitalize()}.")
    return AlreadyExistsError("The prefix overlaps one that is held" + found, conflicts=conflicts)


def _integrity(exc: asyncpg.PostgresError) -> ServiceError | None:  # noqa: PLR0911 - one per kind
    if isinstance(exc, asyncpg.exceptions.ExclusionViolationError):
        return _exclusion(exc)
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        if _constraint(exc) == "pools_name":
            return AlreadyExistsError("A pool of that name exists.")
        return AlreadyExistsError(f"Already exists ({_constraint(exc)}).")
    if isinstance(exc, asyncpg.exceptions.CheckViolationError):
        if _constraint(exc) in {"allocations_child_pool", "allocations_transition"}:
            return PreconditionFailedError(str(exc))
        return InvalidRequestError(f"The database refused the value ({_constraint(exc)}): {exc}")
    if isinstance(exc, asyncpg.exceptions.ForeignKeyViolationError):
        return ReferenceNotFoundError(f"A referenced row does not exist: {exc}")
    if isinstance(exc, asyncpg.exceptions.DataError):
        return InvalidRequestError(f"The database refused the value: {exc}")
    return None


def translate(exc: BaseException) -> ServiceError:
    """The service error for a driver error; unknown errors become DatabaseUnavailableError.

    Constraint violations are mapped by constraint name to the kind the transports report.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, asyncpg.exceptions.LockNotAvailableError):
        return LockTimeoutError("The pool is busy: its lock was not granted in time; retry.")
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return DatabaseUnavailableError(
            "The database did not answer within the statement timeout; retry."
        )
    if isinstance(exc, asyncpg.PostgresError):
        mapped = _integrity(exc)
        if mapped is not None:
            return mapped
    if isinstance(exc, _UNAVAILABLE):
        return DatabaseUnavailableError(f"The database is not answering: {type(exc).__name__}.")
    return DatabaseUnavailableError(f"The database failed: {type(exc).__name__}: {exc}")


# PostgreSQL's binary cidr: family (2 = IPv4, 3 = IPv6), prefix length, is-cidr flag, number
# of address bytes, then the address. Encoding engine prefixes directly skips the text and
# ipaddress round trips, which cost more than the rest of a batch insert together.
_PG_AF: Final = {4: 2, 6: 3}
_VERSION: Final = {2: 4, 3: 6}


def _encode_cidr(value: Prefix | str) -> bytes:
    prefix = value if isinstance(value, Prefix) else parse_prefix(str(value))
    size = 16 if prefix.version == 6 else 4
    header = bytes((_PG_AF[prefix.version], prefix.length, 1, size))
    return header + prefix.value.to_bytes(size, "big")


def _decode_cidr(data: bytes) -> Prefix:
    return Prefix(_VERSION[data[0]], int.from_bytes(data[4 : 4 + data[3]], "big"), data[1])


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )
    await conn.set_type_codec(
        "cidr", encoder=_encode_cidr, decoder=_decode_cidr, schema="pg_catalog", format="binary"
    )


async def _reset_if_needed(conn: asyncpg.Connection) -> None:
    """Reset a connection going back to the pool only if it is inside a transaction.

    asyncpg's default reset costs a round trip on every release (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL): a fifth of a single allocation's. kipam leaves no session state
    behind: settings are startup parameters, advisory locks are transaction-scoped (the
    migration lock is released in a ``finally``), no LISTEN, no cursors. A connection still
    in a transaction (an interrupted caller) gets the full reset, which rolls it back.
    """
    if conn.is_in_transaction():
        await conn.reset()


class Database:
    """The asyncpg connection pool, with errors translated at the boundary."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 10.0) -> None:
        self._pool = pool
        # The most a caller waits for a free connection (every one busy): then UNAVAILABLE.
        self._acquire_s = acquire_timeout_s

    @classmethod
    async def open(cls, dsn: str, settings: Settings) -> Database:
        """Connect; every connection gets the statement timeout and JSON codecs.

        Raises:
            DatabaseUnavailableError: PostgreSQL cannot be reached.
        """
        timeout_ms = int(settings.statement_timeout_s * 1000)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                init=_init_connection,
                reset=_reset_if_needed,
                timeout=settings.statement_timeout_s,
                command_timeout=settings.statement_timeout_s,
                server_settings={
                    "statement_timeout": str(timeout_ms),
                    "idle_in_transaction_session_timeout": str(timeout_ms * 3),
                    # Plan each prepared statement once per connection. Custom plans cost
                    # more to make than to run here (lookup: 0.7 ms planning across the
                    # partitions, 0.08 ms running); ANALYZE still invalidates stale plans.
                    "plan_cache_mode": "force_generic_plan",
                    "application_name": "kipam",
                },
            )
        except Exception as exc:
            raise translate(exc) from exc
        return cls(pool, acquire_timeout_s=settings.statement_timeout_s)

    async def close(self) -> None:
        """Close every connection, waiting at most 10 s for those in use."""
        try:
            await self._pool.close()
        except TimeoutError:  # pragma: no cover - a stuck connection at shutdown
            self._pool.terminate()

    def stats(self) -> tuple[int, int, int]:
        """The connection pool's size, idle connections and maximum size (for metrics)."""
        return self._pool.get_size(), self._pool.get_idle_size(), self._pool.get_max_size()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; driver errors inside become service errors."""
        try:
            async with self._pool.acquire(timeout=self._acquire_s) as conn:
                # A pool proxy behaves as the connection it wraps.
                yield cast("asyncpg.Connection", conn)
        except ServiceError:
            raise
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise translate(exc) from exc

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one query on a pooled connection."""
        try:
            async with self._pool.acquire(timeout=self._acquire_s) as conn:
                rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise translate(exc) from exc
        return rows

    async def fetch_raw(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run one statement on a pooled connection; driver errors are raised untranslated.

        For callers that tell one database refusal from another (the fenced write).
        """
        async with self._pool.acquire(timeout=self._acquire_s) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """Run one query returning at most one row."""
        try:
            async with self._pool.acquire(timeout=self._acquire_s) as conn:
                row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise translate(exc) from exc
        return row

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            async with self.connection() as conn:
                return bool(await conn.fetchval("SELECT true"))
        except ServiceError:
            return False
