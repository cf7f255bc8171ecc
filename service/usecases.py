"""The use cases: the one layer that gRPC, REST and the CLI call.

One allocation, end to end (DESIGN.md), as this module runs it:

1. an idempotency hit returns the existing allocation without any lock;
2. the request joins the queue of its pool's lane in this process (:class:`_Lane`); one task
   per lane drains the queue, so requests waiting on the lane's pools are served **together
   in one transaction** (group commit), each with its own answer or its own failure;
3. the batch takes its pools' distributed locks (Redis, or PostgreSQL advisory locks);
4. ``BEGIN``; the pool rows ``FOR UPDATE`` in id order (each generation is a fencing token);
   each engine cache is refreshed from the changes since its generation, or rebuilt;
5. the engine decides every prefix of the batch (pure, microseconds);
6. the allocations, their history and the new generation are written in one statement;
   ``COMMIT``. An exclusion violation means the cache was wrong: it is rebuilt and the batch
   retried once. Any other failure discards the cache (rebuilt on next use) and fails the
   batch's requests with the translated error; nothing half-written survives the rollback.

The single-statement path (:meth:`_Lane._fast`): once this process has seen a pool in a
locked transaction, a batch of plain allocations skips steps 3-4 and 6's transaction. Its
engines decide, and **one autocommitted statement** locks the pool rows in id order, bumps
each generation only where it still is the engine's, and inserts the rows and history only
if every generation was bumped; otherwise the statement aborts whole, the engines take their
decisions back, and the batch goes the locked way. One round trip instead of four; the
fence, not the lock, is what makes it safe (invariants 1 and 6), and a later writer of a
pool still gets a larger transaction id (the change feed's ordering, migration 0002).
Batches that release, create or delete child pools, dry runs, and pools whose quarantines
may have ended (a sweep is due) always take the locked path.

Exclusive jobs (:meth:`Kipam.exclusive`: cluster plans and deletes, sticky reclaims) take the
same locked path over several pools, alone in their transaction: their work gets a
:class:`Session` that writes through the same statements, may create pools inside the
transaction, and commits or rolls back whole (a dry run always rolls back).

Reads that need the engine (usage, available prefixes) take the pool's in-process mutex and
refresh the engine to the pool row's generation, so they see every change committed before
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar, cast

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace

from engine import (
    EngineError,
    PoolAllocator,
    Prefix,
)
from engine.cluster import check_special_purpose
from engine.errors import InvalidError
from service.errors import (
    AllocationNotFoundError,
    AlreadyExistsError,
    DatabaseUnavailableError,
    InvalidRequestError,
    PoolNotFoundError,
    PreconditionFailedError,
    ServiceError,
)
from service.feed import ChangeFeed
from service.locks import begin_with_locks
from service.models import (
    CONTROL,
    ROLES,
    STATES,
    Allocation,
    AllocationRequest,
    Page,
    Pool,
    PoolPolicy,
    PoolUsage,
    RequestContext,
    check_labels,
    check_owner,
    check_pool_name,
    to_address,
    to_prefix,
)
from service.observe import Observer, span_of, traced
from service.store import (
    ALLOCATION_COLUMNS,
    CHANGE_COLUMNS,
    POOL_COLUMNS,
    allocation_from_row,
    change_from_row,
    pool_from_row,
    prefix_from_db,
    translate,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

    from service.locks import LockManager
    from service.models import Change
    from service.store import Database

__all__ = ["POOL_FROM", "Kipam", "LockedPool", "Session", "parse_selector"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

MAX_PAGE: Final = 1000
MAX_BATCH: Final = 10_000
_POOL_FROM: Final = """
    FROM pools p JOIN spaces s ON s.id = p.space_id LEFT JOIN pools pp ON pp.id = p.parent_id
"""
POOL_FROM: Final = _POOL_FROM
_ALLOCATION_FROM: Final = "FROM allocations a JOIN pools p ON p.id = a.pool_id"
_CHANGE_FROM: Final = "FROM changes c"
# Allocations are partitioned by pool. Questions that do not name the pool go through the
# change log, which is one table with its own prefix index, and then into one partition each:
# by allocation id (the pool of an allocation never changes) ...
_POOL_OF_ALLOCATION: Final = (
    "SELECT pool_id FROM changes WHERE allocation_id = $1 AND kind = 'allocation.created'"
)
# ... and by address: the creations whose prefix contains it, joined to their partitions.
_HELD_FROM: Final = """
    FROM changes c
    JOIN allocations a ON a.pool_id = c.pool_id AND a.id = c.allocation_id
    JOIN pools p ON p.id = a.pool_id
"""
_HELD_WHERE: Final = "c.kind = 'allocation.created'"
# New allocation rows and their history records, across pools, in one statement: the two
# forms below share the rows (`new`), the history (`hist`) and the answer.
_NEW: Final = """
WITH new AS (
    SELECT * FROM unnest($1::bigint[], $2::cidr[], $3::text[], $4::bigint[], $5::cidr[],
                         $6::text[], $7::jsonb[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $12::int[])
        AS t(pool_id, pool_cidr, pool_name, generation, prefix, owner, labels,
             idempotency_key, actor, request_id, trace_id, ord)
)"""
_INSERT_FROM: Final = """, ins AS (
    INSERT INTO allocations (pool_id, pool_cidr, prefix, owner, labels, idempotency_key, revision)
    SELECT new.pool_id, new.pool_cidr, new.prefix, new.owner, new.labels, new.idempotency_key,
           nextval('kipam_revision')
      FROM {source} ORDER BY new.ord
    RETURNING *
), hist AS (
    INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation, allocation_id,
                         prefix, owner, actor, request_id, trace_id, data)
    SELECT ins.revision, 'allocation.created', ins.pool_id, new.pool_name, new.generation,
           ins.id, ins.prefix, ins.owner, new.actor, new.request_id, new.trace_id,
           jsonb_build_object('labels', ins.labels)
      FROM ins JOIN new ON new.pool_id = ins.pool_id AND new.prefix = ins.prefix
)"""
_INSERT_ANSWER: Final = """
SELECT ins.id, ins.pool_id, new.pool_name AS pool, ins.prefix, ins.owner, ins.labels, ins.state,
       ins.created_at, ins.released_at, ins.reusable_at, ins.revision, ins.idempotency_key
  FROM ins JOIN new ON new.pool_id = ins.pool_id AND new.prefix = ins.prefix
"""
# Inside the locked transaction: the pool rows are held, so the bump needs no condition.
_INSERT_ALLOCATIONS: Final = (
    _NEW  # noqa: S608 - fixed text, no input
    + _INSERT_FROM.format(source="new")
    + """, generation AS (
    UPDATE pools SET generation = generation + 1 WHERE id = ANY($13::bigint[])
)"""
    + _INSERT_ANSWER
)
# The single-statement path. Like the locked path it takes the pool rows first, in id order
# (no deadlock with it or with itself), and bumps each generation only where it is still
# the engine's ($14). The rows are inserted only after kipam_fence (migration 0004) has seen
# every pool bumped: its filter is evaluated before the first row, so the bump and its
# row locks come first, and a pool that moved (or was deleted) aborts the whole statement.
_INSERT_FENCED: Final = (
    _NEW  # noqa: S608 - fixed text, no input
    + """, locked AS (
    SELECT p.id, p.generation FROM pools p
     WHERE p.id = ANY($13::bigint[]) AND p.deleted_at IS NULL
     ORDER BY p.id FOR UPDATE
), generation AS (
    UPDATE pools p SET generation = p.generation + 1
      FROM locked JOIN unnest($13::bigint[], $14::bigint[]) AS g(id, expected)
           ON g.id = locked.id AND g.expected = locked.generation
     WHERE p.id = locked.id
    RETURNING p.id
)"""
    + _INSERT_FROM.format(
        source="new WHERE kipam_fence((SELECT count(*) FROM generation), "
        "cardinality($13::bigint[]))"
    )
    + _INSERT_ANSWER
)
_SELECTOR: Final = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*))?\s*"
)

Selector = list[tuple[str, str, str | None]]


def parse_selector(text: str) -> Selector:
    """Parse an equality-based Kubernetes label selector: ``k=v,k2!=v2,k3,!k4``.

    Returns:
        (key, operator, value) triples; operator is ``=``, ``!=``, ``exists`` or ``!exists``.

    Raises:
        InvalidRequestError: a term that is not of those shapes.
    """
    out: Selector = []
    if not text.strip():
        return out
    for term in text.split(","):
        match = _SELECTOR.fullmatch(term)
        if not match or (match["neg"] and match["op"]):
            raise InvalidRequestError(
                f"Label selector term {term.strip()!r} is not k=v, k!=v, k or !k.",
                field="selector",
            )
        op = match["op"]
        if op is None:
            out.append((match["key"], "!exists" if match["neg"] else "exists", None))
        else:
            out.append((match["key"], "!=" if op == "!=" else "=", match["value"]))
    return out


def _selector_sql(selector: Selector, column: str, args: list[object]) -> list[str]:
    clauses: list[str] = []
    for key, op, value in selector:
        args.append(key)
        key_arg = f"${len(args)}"
        if op == "exists":
            clauses.append(f"{column} ? {key_arg}")
        elif op == "!exists":
            clauses.append(f"NOT {column} ? {key_arg}")
        else:
            args.append(value)
            match = f"{column} ->> {key_arg} = ${len(args)}"
            # Kubernetes: k!=v also matches objects without k.
            clauses.append(
                match if op == "=" else f"({column} ->> {key_arg} IS DISTINCT FROM ${len(args)})"
            )
    return clauses


# -- write lanes -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Allocate:
    pool_id: int
    requests: list[AllocationRequest]
    dry_run: bool
    ctx: RequestContext
    # Per request: the allocation and whether it is new; a dry run answers prefixes instead.
    future: asyncio.Future[list[tuple[Allocation | Prefix, bool]]]
    # The caller's trace context: the batch's span continues the first caller's trace.
    trace: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass(slots=True)
class _Release:
    pool_id: int
    allocation_id: int
    ctx: RequestContext
    future: asyncio.Future[Allocation]
    # The caller's trace context: the batch's span continues the first caller's trace.
    trace: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass(slots=True)
class _CreateChild:
    pool_id: int  # the parent
    name: str
    role: str
    length: int | None
    cidr: Prefix | None
    policy: PoolPolicy
    labels: dict[str, str]
    idempotency_key: str | None
    ctx: RequestContext
    future: asyncio.Future[int]
    # The caller's trace context: the batch's span continues the first caller's trace.
    trace: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass(slots=True)
class _DeleteChild:
    pool_id: int  # the parent
    child_id: int
    ctx: RequestContext
    future: asyncio.Future[None]
    # The caller's trace context: the batch's span continues the first caller's trace.
    trace: otel_context.Context = field(default_factory=otel_context.get_current)


@dataclass(slots=True)
class _Exclusive:
    """Work over several pools in one transaction of its own (cluster plans and deletes).

    Served alone, never batched with other jobs: it commits or rolls back whole. ``work``
    gets a :class:`Session` over the locked pools; a dry run (``commit`` false) rolls back
    after it and answers what it returned.
    """

    pool_id: int  # the lane's pick: the first of pool_ids
    pool_ids: tuple[int, ...]
    work: Callable[[Session], Awaitable[object]]
    commit: bool
    future: asyncio.Future[object]
    # The caller's trace context: the batch's span continues the first caller's trace.
    trace: otel_context.Context = field(default_factory=otel_context.get_current)


_Job = _Allocate | _Release | _CreateChild | _DeleteChild | _Exclusive


def _pools_of(job: _Job) -> tuple[int, ...]:
    return job.pool_ids if isinstance(job, _Exclusive) else (job.pool_id,)


@dataclass(slots=True)
class _Locked:
    """A pool whose row the batch's transaction has locked, with its fresh engine."""

    id: int
    name: str
    cidr: object  # as asyncpg returns it, passed back unchanged
    generation: int  # before this transaction
    policy: PoolPolicy
    engine: PoolAllocator
    changed: bool = False

    @property
    def next_generation(self) -> int:
        """The generation this transaction writes if it changes the pool."""
        return self.generation + 1


@dataclass(slots=True)
class _Write:
    """New allocation rows of one transaction, across pools, with who asked for each."""

    pool_ids: list[int] = field(default_factory=list)
    pool_cidrs: list[object] = field(default_factory=list)
    pool_names: list[str] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    prefixes: list[Prefix] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    trace_ids: list[str | None] = field(default_factory=list)

    def add(
        self, pool: _Locked, prefix: Prefix, request: AllocationRequest, ctx: RequestContext
    ) -> None:
        self.pool_ids.append(pool.id)
        self.pool_cidrs.append(pool.cidr)
        self.pool_names.append(pool.name)
        self.generations.append(pool.next_generation)
        self.prefixes.append(prefix)
        self.owners.append(request.owner)
        self.labels.append(request.labels)
        self.keys.append(request.idempotency_key)
        self.actors.append(ctx.actor)
        self.request_ids.append(ctx.request_id)
        self.trace_ids.append(ctx.trace_id)
        pool.changed = True

    def args(self) -> tuple[object, ...]:
        return (
            self.pool_ids,
            self.pool_cidrs,
            self.pool_names,
            self.generations,
            self.prefixes,
            self.owners,
            self.labels,
            self.keys,
            self.actors,
            self.request_ids,
            self.trace_ids,
            list(range(len(self.prefixes))),
        )


class _MovedError(Exception):
    """The single-statement path could not write: the locked path takes the batch."""


# Refusals of the fenced statement that the locked path resolves: a generation moved (40001),
# a row overlaps (the engine was stale), an idempotency key was used meanwhile.
_FALL_BACK: Final = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.ExclusionViolationError,
    asyncpg.exceptions.UniqueViolationError,
)
_FOREVER: Final = dt.datetime.max.replace(tzinfo=dt.UTC)


LockedPool = _Locked


class _DryRunError(Exception):
    """Raised to roll a dry run back; its answers are already made."""


class _CacheWrongError(Exception):
    """The database refused what the engine decided: the cache disagreed with the truth."""


class _Engines:
    """This process's engine per pool (invariant 6), and a mutex per pool guarding it."""

    def __init__(self) -> None:
        self._engines: dict[int, PoolAllocator] = {}
        self._mutexes: dict[int, asyncio.Lock] = {}
        # What the single-statement path needs besides the engine, learnt by the locked path:
        # the pool's row facts (name, CIDR, policy never change) and the time before which
        # no quarantine of the pool ends (so no sweep is due).
        self.facts: dict[int, tuple[str, object, PoolPolicy]] = {}
        self.quiet_until: dict[int, dt.datetime] = {}

    def ready(self, pool_id: int, now: dt.datetime) -> PoolAllocator | None:
        """The engine, if the single-statement path may write the pool on it now."""
        engine = self._engines.get(pool_id)
        if engine is None or pool_id not in self.facts:
            return None
        if self.quiet_until.get(pool_id, now) <= now:
            return None
        return engine

    def mutex(self, pool_id: int) -> asyncio.Lock:
        lock = self._mutexes.get(pool_id)
        if lock is None:
            lock = self._mutexes[pool_id] = asyncio.Lock()
        return lock

    def loaded(self) -> list[tuple[str, PoolAllocator]]:
        """The pools whose engines this process holds, by name (for metrics: no I/O)."""
        return [
            (self.facts[pool_id][0], engine)
            for pool_id, engine in list(self._engines.items())
            if pool_id in self.facts
        ]

    def discard(self, pool_id: int) -> None:
        self._engines.pop(pool_id, None)
        self.quiet_until.pop(pool_id, None)

    async def fresh(self, conn: asyncpg.Connection, pool_id: int, generation: int) -> PoolAllocator:
        """The pool's engine at ``generation``: as is, refreshed from changes, or rebuilt."""
        engine = self._engines.get(pool_id)
        if engine is not None and engine.generation == generation:
            return engine
        if engine is not None and engine.generation < generation:
            rows = await conn.fetch(
                "SELECT kind, prefix FROM changes WHERE pool_id = $1 AND pool_generation > $2"
                " AND kind IN ('allocation.created', 'allocation.released') ORDER BY revision",
                pool_id,
                engine.generation,
            )
            try:
                for row in rows:
                    prefix = prefix_from_db(row["prefix"])
                    if row["kind"] == "allocation.created":
                        engine.occupy(prefix)
                    else:
                        engine.release(prefix)
            except EngineError:
                _log.warning("pool %s: replay failed; rebuilding the engine", pool_id)
            else:
                engine.generation = generation
                return engine
        return await self._rebuild(conn, pool_id, generation)

    async def _rebuild(
        self, conn: asyncpg.Connection, pool_id: int, generation: int
    ) -> PoolAllocator:
        self._engines.pop(pool_id, None)
        row = await conn.fetchrow("SELECT cidr, policy FROM pools WHERE id = $1", pool_id)
        if row is None:  # pragma: no cover - callers hold the pool row
            raise PoolNotFoundError(f"#{pool_id}")
        held = await conn.fetch(
            "SELECT prefix FROM allocations WHERE pool_id = $1 AND state <> 'released'", pool_id
        )
        policy = PoolPolicy.from_json(row["policy"]).engine_policy()
        engine = PoolAllocator(
            prefix_from_db(row["cidr"]), policy, (prefix_from_db(r["prefix"]) for r in held)
        )
        engine.generation = generation
        self._engines[pool_id] = engine
        return engine


class _Lane:
    """Serves the writes of a fixed set of pools, a batch per transaction.

    Jobs queue while a transaction runs; the next transaction takes everything queued (up
    to ``batch_max``), across the lane's pools: requests that waited are served together
    (group commit), each with its own answer or its own failure. Pools belong to one lane
    each (``pool_id % lanes``), so lanes never contend for a pool within a process.
    """

    def __init__(self, kipam: Kipam, number: int) -> None:
        self.kipam = kipam
        self.number = number
        self.queue: deque[_Job] = deque()
        self.task: asyncio.Task[None] | None = None

    def submit(self, job: _Job) -> None:
        self.queue.append(job)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain(), name=f"kipam-lane-{self.number}")

    async def _drain(self) -> None:
        while self.queue:
            batch: list[_Job] = []
            while self.queue and len(batch) < self.kipam.batch_max:
                job = self.queue.popleft()
                if not job.future.done():  # skip callers that gave up
                    batch.append(job)
            if batch:
                await self._serve(batch)
            # Let the callers just answered queue their next request before the queue is
            # looked at again, so that it joins the next batch instead of waiting a whole
            # transaction. (A fresh task needs no such turn: it starts after its submitters.)
            await asyncio.sleep(0)

    async def _serve(self, batch: list[_Job]) -> None:
        """Run one batch; a failure of the whole batch goes to every caller still waiting."""
        exclusive = [job for job in batch if isinstance(job, _Exclusive)]
        if exclusive:  # each alone, after the rest
            rest: list[_Job] = [job for job in batch if not isinstance(job, _Exclusive)]
            if rest:
                await self._serve_one(rest)
            for job in exclusive:
                await self._serve_one([job])
            return
        await self._serve_one(batch)

    async def _serve_one(self, batch: list[_Job]) -> None:
        # One span per batch: a child of the first caller's span, linked to the others'.
        links = [
            trace.Link(context)
            for job in batch[1:]
            if (context := trace.get_current_span(job.trace).get_span_context()).trace_flags.sampled
        ]
        try:
            with span_of(
                "kipam.batch",
                parent=batch[0].trace,
                links=links,
                attributes={"kipam.batch_size": len(batch), "kipam.lane": self.number},
            ):
                await self._run(batch)
        except BaseException as exc:
            error = exc if isinstance(exc, ServiceError | EngineError) else translate(exc)
            if not isinstance(exc, ServiceError | EngineError | asyncpg.PostgresError | OSError):
                _log.exception("lane %s: batch failed", self.number)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _run(self, batch: list[_Job]) -> None:
        if all(isinstance(job, _Allocate) and not job.dry_run for job in batch):
            try:
                if await self._fast(cast("list[_Allocate]", batch)):
                    return
            except _MovedError:
                pass  # another writer got there first: the locked path catches up
        try:
            await self._transaction(batch)
        except _CacheWrongError:
            # Nothing was answered yet: answers are set only after COMMIT.
            _log.warning("lane %s: an engine disagreed with the database; rebuilt", self.number)
            try:
                await self._transaction(batch)
            except _CacheWrongError as exc:
                raise translate(exc.__cause__ or exc) from exc

    async def _fast(self, batch: list[_Allocate]) -> bool:
        """Allocate in one statement, without locking pool rows; False if it cannot.

        Possible when every pool's engine, facts and quarantine horizon are known from an
        earlier locked transaction of this process. The engines decide as usual; one
        autocommitted statement writes the rows and history and bumps each pool's generation
        only where it still is the engine's (``_INSERT_FENCED``). If another writer moved a
        generation, or the database refuses a row (a key used meanwhile, an overlap), the
        statement aborts whole, the engines take their decisions back and the batch goes the
        locked way. Correctness never rests on the locks here: the fence is the guarantee,
        the Redis lock (when there is one) only keeps replicas from colliding.
        """
        kipam = self.kipam
        pool_ids = sorted({job.pool_id for job in batch})
        now = kipam.clock()
        if any(kipam.engines.ready(pool_id, now) is None for pool_id in pool_ids):
            return False
        async with contextlib.AsyncExitStack() as stack:
            for pool_id in pool_ids:
                await stack.enter_async_context(kipam.engines.mutex(pool_id))
            if kipam.locks.backend == "redis":
                await stack.enter_async_context(kipam.locks.hold_many(pool_ids))
            locked: dict[int, _Locked] = {}
            for pool_id in pool_ids:
                engine = kipam.engines.ready(pool_id, now)  # again, under the mutex
                if engine is None:
                    return False
                name, cidr, policy = kipam.engines.facts[pool_id]
                locked[pool_id] = _Locked(pool_id, name, cidr, engine.generation, policy, engine)
            write = _Write()
            with span_of("kipam.engine.decide"):
                pending = [
                    (job, await self._decide(None, locked[job.pool_id], job, write))
                    for job in batch
                ]
            changed = [p for p in locked.values() if p.changed]
            inserted = await self._fenced_insert(changed, write) if write.prefixes else {}
            _settle([(job, _answer(decided, inserted, job.pool_id)) for job, decided in pending])
        return True

    async def _fenced_insert(
        self, changed: list[_Locked], write: _Write
    ) -> dict[tuple[int, Prefix], Allocation]:
        """The fenced statement; on a refusal the engines take their decisions back."""
        try:
            inserted = await self._insert(
                None, write, [p.id for p in changed], [p.generation for p in changed]
            )
        except BaseException as exc:
            for pool in changed:  # nothing was written
                ours = [x for i, x in enumerate(write.prefixes) if write.pool_ids[i] == pool.id]
                pool.engine.release_many(ours)
                if isinstance(exc, asyncpg.exceptions.ExclusionViolationError):
                    self.kipam.engines.discard(pool.id)  # it disagreed with the database
            if isinstance(exc, _FALL_BACK):
                raise _MovedError from exc
            raise
        for pool in changed:
            pool.engine.generation = pool.next_generation
        self.kipam.feed.wake()
        return inserted

    async def _transaction(self, batch: list[_Job]) -> None:  # noqa: C901, PLR0912 - the write path in one place
        kipam = self.kipam
        pool_ids = sorted({pool_id for job in batch for pool_id in _pools_of(job)})
        results: list[tuple[_Job, object]] = []
        locked: dict[int, _Locked] = {}
        commit = all(job.commit for job in batch if isinstance(job, _Exclusive))
        async with contextlib.AsyncExitStack() as stack:
            # Always in pool id order, here and in every replica: no deadlocks.
            for pool_id in pool_ids:
                await stack.enter_async_context(kipam.engines.mutex(pool_id))
            conn = await self._begin(stack, pool_ids)
            try:
                await self._lock_pools(conn, pool_ids, locked)
                write = _Write()
                pending: list[tuple[_Allocate, list[object]]] = []
                # One span for the batch's decisions (the engine's, and each job's reads).
                with span_of("kipam.engine.decide", attributes={"kipam.jobs": len(batch)}):
                    for job in batch:
                        pool = locked.get(job.pool_id)
                        if isinstance(job, _Exclusive):
                            results.append((job, await job.work(Session(self, conn, locked))))
                        elif pool is None:
                            results.append((job, PoolNotFoundError(f"#{job.pool_id}")))
                        elif isinstance(job, _Allocate):
                            pending.append((job, await self._decide(conn, pool, job, write)))
                        else:
                            results.append((job, await self._other(conn, pool, job)))
                changed = [p.id for p in locked.values() if p.changed]
                inserted: dict[tuple[int, Prefix], Allocation] = {}
                if write.prefixes:  # the generations are bumped by the same statement
                    inserted = await self._insert(conn, write, changed)
                elif changed:
                    await conn.execute(
                        "UPDATE pools SET generation = generation + 1 WHERE id = ANY($1::bigint[])",
                        changed,
                    )
                for job, decided in pending:
                    results.append((job, _answer(decided, inserted, job.pool_id)))
                if not commit:
                    raise _DryRunError  # noqa: TRY301 - the rollback below is the one way out
                await conn.execute("COMMIT")
            except BaseException as exc:
                for pool_id in locked.keys() | set(pool_ids):  # their decisions were undone
                    kipam.engines.discard(pool_id)
                await _rollback(conn)
                if isinstance(exc, _DryRunError):
                    _settle(results)
                    return
                if isinstance(exc, asyncpg.exceptions.ExclusionViolationError):
                    raise _CacheWrongError from exc
                raise
            for pool in locked.values():
                if pool.changed:
                    pool.engine.generation = pool.next_generation
            kipam.feed.wake()
            # Answer before the locks are released: while the release goes to Redis, the
            # callers queue their next requests, which then share the next transaction.
            _settle(results)

    async def _begin(
        self, stack: contextlib.AsyncExitStack[bool | None], pool_ids: list[int]
    ) -> asyncpg.Connection:
        """Take the pools' locks and BEGIN; the connection, held (and released) by ``stack``.

        The wait (Redis before a connection is taken, so waiting holds none; advisory inside
        BEGIN) is one span, reported to the observer; the hold, until ``stack`` closes,
        another.
        """
        kipam = self.kipam
        started = time.perf_counter()
        with span_of("kipam.lock.wait", attributes={"kipam.pools": len(pool_ids)}) as wait:
            holds = await stack.enter_async_context(kipam.locks.hold_many(pool_ids))
            conn = await stack.enter_async_context(kipam.db.connection())
            try:
                # BEGIN and the advisory locks in one round trip; COMMIT later. Managed by
                # hand (not conn.transaction()) to save those round trips on every batch.
                await begin_with_locks(conn, holds)
            except BaseException:
                await _rollback(conn)
                raise
            backend = holds[0].backend if holds else "none"
            wait.set_attribute("kipam.lock.backend", backend)
        kipam.observer.lock_waited(backend, time.perf_counter() - started)
        stack.enter_context(span_of("kipam.lock.hold", attributes={"kipam.lock.backend": backend}))
        return conn

    async def _lock_pools(
        self, conn: asyncpg.Connection, pool_ids: list[int], locked: dict[int, _Locked]
    ) -> None:
        """Lock the pool rows (fencing: their generations), refresh engines, end quarantines."""
        rows = await conn.fetch(
            "SELECT p.id, p.name, p.cidr, p.generation, p.policy, q.due, q.next_end"
            " FROM pools p LEFT JOIN LATERAL ("
            "  SELECT bool_or(reusable_at <= now()) AS due,"
            "         min(reusable_at) FILTER (WHERE reusable_at > now()) AS next_end"
            "    FROM allocations WHERE pool_id = p.id AND state = 'quarantined') q ON true"
            " WHERE p.id = ANY($1::bigint[]) AND p.deleted_at IS NULL"
            " ORDER BY p.id FOR UPDATE OF p",
            pool_ids,
        )
        engines = self.kipam.engines
        for row in rows:
            pool = _Locked(
                id=row["id"],
                name=row["name"],
                cidr=row["cidr"],
                generation=row["generation"],
                policy=PoolPolicy.from_json(row["policy"]),
                engine=await engines.fresh(conn, row["id"], row["generation"]),
            )
            locked[pool.id] = pool
            engines.facts[pool.id] = (pool.name, pool.cidr, pool.policy)
            engines.quiet_until[pool.id] = row["next_end"] or _FOREVER
            if row["due"]:
                await self._sweep(conn, pool)

    async def _other(self, conn: asyncpg.Connection, pool: _Locked, job: _Job) -> object:
        if isinstance(job, _Release):
            return await self._release(conn, pool, job.allocation_id, job.ctx)
        if isinstance(job, _CreateChild):
            return await self._create_child(conn, pool, job)
        if isinstance(job, _DeleteChild):
            return await self._delete_child(conn, pool, job)
        raise TypeError(job)  # pragma: no cover

    async def _sweep(self, conn: asyncpg.Connection, pool: _Locked) -> None:
        """Quarantines that ended: released for good, and free again in the engine."""
        await _end_held(conn, pool, _QUARANTINE_ENDED, everything=False)

    async def _decide(
        self, conn: asyncpg.Connection | None, pool: _Locked, job: _Allocate, write: _Write
    ) -> list[object]:
        """Per request: an existing allocation (idempotent replay), a new prefix, or an error.

        Without ``conn`` (the single-statement path) keys are not looked up: one used
        meanwhile makes the insert fail, and the locked path answers the replay.
        """
        keys = [r.idempotency_key for r in job.requests if r.idempotency_key is not None]
        existing: dict[str, Allocation] = {}
        if keys and conn is not None:
            rows = await conn.fetch(
                f"SELECT {ALLOCATION_COLUMNS} {_ALLOCATION_FROM}"
                " WHERE a.pool_id = $1 AND a.idempotency_key = ANY($2::text[])",
                pool.id,
                keys,
            )
            existing = {r["idempotency_key"]: allocation_from_row(r) for r in rows}
        engine = pool.engine
        decided: list[object] = []
        fresh: list[Prefix] = []
        taken_keys = (
            {k for pid, k in zip(write.pool_ids, write.keys, strict=True) if pid == pool.id and k}
            if keys
            else set()
        )
        try:
            for request in job.requests:
                key = request.idempotency_key
                if key is not None and key in existing:
                    decided.append(_replay(existing[key], request))
                    continue
                if key is not None and key in taken_keys:
                    decided.append(("same-key", key))
                    continue
                prefix = (
                    engine.allocate_prefix(request.prefix)
                    if request.prefix is not None
                    else engine.allocate(request.length)
                )
                fresh.append(prefix)
                decided.append(prefix)
        except (EngineError, ServiceError) as exc:
            engine.release_many(fresh)
            return [exc]
        if job.dry_run:
            engine.release_many(fresh)
            return decided
        for request, item in zip(job.requests, decided, strict=True):
            if isinstance(item, Prefix):
                write.add(pool, item, request, job.ctx)
        return decided

    async def _insert(
        self,
        conn: asyncpg.Connection | None,
        write: _Write,
        changed: list[int],
        expected: list[int] | None = None,
    ) -> dict[tuple[int, Prefix], Allocation]:
        """Write the batch's new rows: in ``conn``'s transaction, or fenced on its own."""
        if conn is None:
            rows = await self.kipam.db.fetch_raw(_INSERT_FENCED, *write.args(), changed, expected)
            if len(rows) != len(write.prefixes):  # pragma: no cover - the fence forbids it
                _log.error("fenced insert wrote %d of %d rows", len(rows), len(write.prefixes))
                raise DatabaseUnavailableError("A fenced write was incomplete; see the log.")
        else:
            rows = await conn.fetch(_INSERT_ALLOCATIONS, *write.args(), changed)
        return {(r["pool_id"], prefix_from_db(r["prefix"])): allocation_from_row(r) for r in rows}

    async def _release(
        self, conn: asyncpg.Connection, pool: _Locked, allocation_id: int, ctx: RequestContext
    ) -> Allocation | BaseException:
        row = await conn.fetchrow(
            "SELECT a.id, a.prefix, a.state, a.owner,"
            " EXISTS (SELECT 1 FROM pools c WHERE c.parent_allocation_id = a.id"
            "         AND c.deleted_at IS NULL) AS child"
            " FROM allocations a WHERE a.id = $1 AND a.pool_id = $2 FOR UPDATE",
            allocation_id,
            pool.id,
        )
        if row is None:
            return AllocationNotFoundError(allocation_id)
        if row["state"] == "active":
            if row["child"]:
                return PreconditionFailedError(
                    f"Allocation {allocation_id} is the CIDR of a child pool; delete that "
                    "pool to release it."
                )
            quarantine = pool.policy.quarantine_seconds
            state = "quarantined" if quarantine > 0 else "released"
            await conn.execute(
                """
                WITH upd AS (
                    UPDATE allocations
                       SET state = $2, released_at = now(),
                           reusable_at = now() + make_interval(secs => $3),
                           revision = nextval('kipam_revision')
                     WHERE id = $1
                    RETURNING id, prefix, owner, revision, reusable_at
                )
                INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation,
                                     allocation_id, prefix, owner, actor, request_id, trace_id,
                                     data)
                SELECT revision, 'allocation.' || $2, $4, $5, $6, id, prefix, owner, $7, $8, $9,
                       jsonb_build_object('reusable_at', reusable_at)
                  FROM upd
                """,
                allocation_id,
                state,
                float(quarantine),
                pool.id,
                pool.name,
                pool.next_generation,
                ctx.actor,
                ctx.request_id,
                ctx.trace_id,
            )
            pool.changed = True
            if state == "released":
                pool.engine.release(prefix_from_db(row["prefix"]))
        fetched = await conn.fetchrow(
            f"SELECT {ALLOCATION_COLUMNS} {_ALLOCATION_FROM} WHERE a.pool_id = $1 AND a.id = $2",
            pool.id,
            allocation_id,
        )
        if fetched is None:  # pragma: no cover - locked above
            raise AssertionError(allocation_id)
        allocation = allocation_from_row(fetched)
        if allocation.state == "quarantined" and allocation.reusable_at is not None:
            quiet = self.kipam.engines.quiet_until
            quiet[pool.id] = min(quiet.get(pool.id, _FOREVER), allocation.reusable_at)
        return allocation

    async def _create_child(
        self, conn: asyncpg.Connection, pool: _Locked, job: _CreateChild
    ) -> int | BaseException:
        engine = pool.engine
        try:
            prefix = engine.allocate_prefix(job.cidr) if job.cidr else engine.allocate(job.length)
        except EngineError as exc:
            return exc
        write = _Write()
        changed = pool.changed
        write.add(pool, prefix, AllocationRequest(owner=f"pool/{job.name}"), job.ctx)
        # A savepoint: a name already taken undoes only this job.
        await conn.execute("SAVEPOINT child_pool")
        try:
            inserted = await self._insert(conn, write, [])
            allocation = inserted[pool.id, prefix]
            child = await self.kipam._insert_pool(  # noqa: SLF001 - same module
                conn,
                name=job.name,
                cidr=prefix,
                role=job.role,
                policy=job.policy,
                labels=job.labels,
                ctx=job.ctx,
                idempotency_key=job.idempotency_key,
                parent=(pool.id, allocation.id),
            )
        except asyncpg.exceptions.UniqueViolationError as exc:
            await conn.execute("ROLLBACK TO SAVEPOINT child_pool")
            engine.release(prefix)
            pool.changed = changed
            return translate(exc)
        await conn.execute("RELEASE SAVEPOINT child_pool")
        return child

    async def _delete_child(
        self, conn: asyncpg.Connection, pool: _Locked, job: _DeleteChild
    ) -> BaseException | None:
        child = await conn.fetchrow(
            "SELECT id, name, parent_allocation_id FROM pools"
            " WHERE id = $1 AND parent_id = $2 AND deleted_at IS NULL FOR UPDATE",
            job.child_id,
            pool.id,
        )
        if child is None:
            return PoolNotFoundError(f"#{job.child_id}")
        error = await self.kipam._check_empty(conn, child["id"], child["name"])  # noqa: SLF001
        if error is not None:
            return error
        await self.kipam._mark_deleted(conn, child["id"], child["name"], job.ctx)  # noqa: SLF001
        released = await self._release(conn, pool, child["parent_allocation_id"], job.ctx)
        if isinstance(released, BaseException):  # pragma: no cover - the row was just checked
            raise released
        return None


class Session:
    """What an exclusive job's work may do inside its transaction, over locked pools.

    Every write goes through the same statements as the lanes' (history rows, generations),
    and every pool whose allocations it changes (including pools it created) has its
    generation bumped once, at commit.
    """

    def __init__(self, lane: _Lane, conn: asyncpg.Connection, locked: dict[int, _Locked]) -> None:
        self.conn = conn
        self._lane = lane
        self._locked = locked

    def pool(self, pool_id: int) -> _Locked:
        """A locked pool (with its fresh engine).

        Raises:
            PoolNotFoundError: it was deleted before its row could be locked.
        """
        pool = self._locked.get(pool_id)
        if pool is None:
            raise PoolNotFoundError(f"#{pool_id}")
        return pool

    async def allocate(
        self, pool: _Locked, prefixes: Sequence[Prefix], owners: Sequence[str], ctx: RequestContext
    ) -> list[Allocation]:
        """Write allocations of prefixes the caller took from ``pool.engine``."""
        write = _Write()
        for prefix, owner in zip(prefixes, owners, strict=True):
            write.add(pool, prefix, AllocationRequest(owner=owner), ctx)
        inserted = await self._lane._insert(self.conn, write, [])  # noqa: SLF001 - same module
        return [inserted[pool.id, prefix] for prefix in prefixes]

    async def create_pool(  # noqa: PLR0913 - the pool's fields
        self,
        *,
        parent: _Locked,
        name: str,
        cidr: Prefix,
        role: str,
        policy: PoolPolicy,
        labels: dict[str, str],
        ctx: RequestContext,
    ) -> _Locked:
        """A child pool on ``cidr``, which the caller took from ``parent.engine``; locked."""
        (allocation,) = await self.allocate(parent, [cidr], [f"pool/{name}"], ctx)
        kipam = self._lane.kipam
        pool_id = await kipam._insert_pool(  # noqa: SLF001 - same module
            self.conn,
            name=name,
            cidr=cidr,
            role=role,
            policy=policy,
            labels=labels,
            ctx=ctx,
            idempotency_key=None,
            parent=(parent.id, allocation.id),
        )
        engine = PoolAllocator(cidr, policy.engine_policy())
        child = _Locked(pool_id, name, cidr, 0, policy, engine)
        self._locked[pool_id] = child
        return child

    async def release(self, pool: _Locked, allocation_id: int, ctx: RequestContext) -> Allocation:
        """Release one allocation as a release request would (quarantine by policy)."""
        result = await self._lane._release(self.conn, pool, allocation_id, ctx)  # noqa: SLF001
        if isinstance(result, BaseException):
            raise result
        return result

    async def release_all(self, pool: _Locked, ctx: RequestContext) -> int:
        """End every held allocation of a pool at once, quarantines included; their count."""
        return await _end_held(self.conn, pool, ctx, everything=True)

    async def delete_pool(self, pool: _Locked, ctx: RequestContext) -> None:
        """Mark an emptied pool deleted (its CIDR in the parent is released by the caller)."""
        await self._lane.kipam._mark_deleted(self.conn, pool.id, pool.name, ctx)  # noqa: SLF001
        pool.changed = False  # _mark_deleted bumped it; a deleted pool is never written again

    async def reclaim(
        self, pool: _Locked, allocation_id: int, request: AllocationRequest, ctx: RequestContext
    ) -> Allocation | None:
        """Give a quarantined allocation's prefix back to its owner, now; None if gone.

        The quarantined row ends (``released``, with history) and a new active row takes the
        same prefix for ``request``'s owner and labels.
        """
        row = await self.conn.fetchrow(
            "SELECT prefix FROM allocations WHERE pool_id = $1 AND id = $2"
            " AND state = 'quarantined' AND owner = $3 FOR UPDATE",
            pool.id,
            allocation_id,
            request.owner,
        )
        if row is None:
            return None
        prefix = prefix_from_db(row["prefix"])
        await self.conn.execute(
            """
            WITH upd AS (
                UPDATE allocations SET state = 'released', revision = nextval('kipam_revision'),
                       reusable_at = least(reusable_at, now())
                 WHERE pool_id = $1 AND id = $2
                RETURNING id, prefix, owner, revision
            )
            INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation,
                                 allocation_id, prefix, owner, actor, request_id, trace_id, data)
            SELECT revision, 'allocation.released', $1, $3, $4, id, prefix, owner, $5, $6, $7,
                   '{"reclaimed": true}'
              FROM upd
            """,
            pool.id,
            allocation_id,
            pool.name,
            pool.next_generation,
            ctx.actor,
            ctx.request_id,
            ctx.trace_id,
        )
        pool.engine.release(prefix)
        pool.engine.allocate_prefix(prefix)
        write = _Write()
        write.add(pool, prefix, request, ctx)
        inserted = await self._lane._insert(self.conn, write, [])  # noqa: SLF001
        return inserted[pool.id, prefix]


# Who ends quarantines, in the history.
_QUARANTINE_ENDED: Final = RequestContext(actor="kipam/quarantine")


async def _end_held(
    conn: asyncpg.Connection, pool: _Locked, ctx: RequestContext, *, everything: bool
) -> int:
    """Release for good, with history; the number of allocations released.

    The pool's quarantines that ended, or with ``everything`` every allocation it holds
    (active or in quarantine). Their prefixes are free again in its engine.
    """
    rows = await conn.fetch(
        """
        WITH ended AS (
            UPDATE allocations
               SET state = 'released', released_at = coalesce(released_at, now()),
                   reusable_at = least(coalesce(reusable_at, now()), now()),
                   revision = nextval('kipam_revision')
             WHERE pool_id = $1
               AND ((state = 'quarantined' AND reusable_at <= now())
                    OR ($7 AND state <> 'released'))
            RETURNING id, prefix, owner, revision
        ), hist AS (
            INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation,
                                 allocation_id, prefix, owner, actor, request_id, trace_id)
            SELECT revision, 'allocation.released', $1, $2, $3, id, prefix, owner, $4, $5, $6
              FROM ended
        )
        SELECT prefix FROM ended
        """,
        pool.id,
        pool.name,
        pool.next_generation,
        ctx.actor,
        ctx.request_id,
        ctx.trace_id,
        everything,
    )
    for row in rows:
        pool.engine.release(prefix_from_db(row["prefix"]))
    pool.changed = pool.changed or bool(rows)
    return len(rows)


def _settle(results: list[tuple[_Job, object]]) -> None:
    """Answer each caller still waiting: its result, or its own failure."""
    for job, result in results:
        if job.future.done():
            continue
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]


async def _rollback(conn: asyncpg.Connection) -> None:
    """Roll back if the connection still can; a broken one is discarded by the pool."""
    if conn.is_closed() or not conn.is_in_transaction():
        return
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        await conn.execute("ROLLBACK")


def _replay(existing: Allocation, request: AllocationRequest) -> Allocation:
    """An idempotent retry: the stored allocation, if the request asks for the same thing."""
    same = existing.owner == request.owner and (
        (request.prefix is not None and existing.prefix == request.prefix)
        or (request.prefix is None and (request.length in (None, existing.prefix.length)))
    )
    if not same:
        raise AlreadyExistsError(
            f"Idempotency key {request.idempotency_key!r} was used for a different request "
            f"({existing.prefix} for {existing.owner}); use a new key.",
            conflicts=(str(existing.prefix),),
        )
    return existing


# -- the use cases ---------------------------------------------------------------------------


class Kipam:
    """Every use case, over one database and one lock manager."""

    def __init__(  # noqa: PLR0913 - keyword-only settings
        self,
        db: Database,
        locks: LockManager,
        *,
        batch_max: int = 256,
        lanes: int = 2,
        watch_poll_s: float = 0.5,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        observer: Observer | None = None,
    ) -> None:
        self.db = db
        # When quarantines are known to end; read only to pick the write path (tests move it).
        self.clock = clock
        self.locks = locks
        self.batch_max = batch_max
        self.engines = _Engines()
        self.feed = ChangeFeed(db, poll_s=watch_poll_s)
        # Told of every use case's result and duration, and of lock waits (metrics).
        self.observer = observer or Observer()
        self._lanes = [_Lane(self, n) for n in range(max(1, lanes))]
        self._pools: dict[str, Pool] = {}
        from service.cluster_cases import Clusters  # noqa: PLC0415 - it builds on this module

        self.clusters = Clusters(self)

    def _submit(self, job: _Job) -> None:
        self._lanes[job.pool_id % len(self._lanes)].submit(job)

    async def exclusive(
        self, pool_ids: Sequence[int], work: Callable[[Session], Awaitable[T]], *, commit: bool
    ) -> T:
        """Run ``work`` in one transaction of its own over the pools' locks and rows.

        Without ``commit`` (a dry run) the transaction is rolled back after ``work`` returns.
        """
        ids = tuple(sorted(set(pool_ids)))
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._submit(_Exclusive(ids[0], ids, work, commit, future))
        return cast("T", await future)

    async def close(self) -> None:
        """Wait for queued work to finish (bounded by the callers' own deadlines)."""
        tasks = [lane.task for lane in self._lanes if lane.task and not lane.task.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- pools ----------------------------------------------------------------------------------

    @traced("create_pool", pool="name", parent="parent", prefix_length="prefix_length")
    async def create_pool(  # noqa: PLR0913 - the pool's fields
        self,
        name: str,
        *,
        cidr: str | Prefix | None = None,
        parent: str | None = None,
        prefix_length: int | None = None,
        role: str = "container",
        space: str = "default",
        policy: PoolPolicy | None = None,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        ctx: RequestContext | None = None,
    ) -> tuple[Pool, bool]:
        """Create a root pool (``cidr``) or a child pool carved from ``parent``.

        A child pool's CIDR is an allocation in its parent: by ``prefix_length`` (the parent
        chooses) or by ``cidr`` (exact). With an ``idempotency_key``, a retry answers with the
        pool the key created.

        Returns:
            The pool and whether it was created now (False: an idempotent replay).

        Raises:
            InvalidRequestError: bad name, role, CIDR or policy; special-purpose ranges.
            PoolNotFoundError: no such parent.
            AlreadyExistsError: the name is taken, the CIDR overlaps, or the key was used for
                another pool.
        """
        ctx = ctx or RequestContext()
        check_pool_name(name)
        if idempotency_key is not None:
            _check_key(idempotency_key)
            replay = await self._pool_replay(name, idempotency_key)
            if replay is not None:
                return replay, False
        try:
            pool = await self._create_pool(
                name,
                cidr=cidr,
                parent=parent,
                prefix_length=prefix_length,
                role=role,
                space=space,
                policy=policy,
                labels=labels,
                idempotency_key=idempotency_key,
                ctx=ctx,
            )
        except AlreadyExistsError:
            replay = await self._pool_replay(name, idempotency_key) if idempotency_key else None
            if replay is None:  # not a concurrent retry of the same request
                raise
            return replay, False
        return pool, True

    async def _pool_replay(self, name: str, key: str) -> Pool | None:
        """The live pool ``key`` created under ``name``, None if the key is unused.

        Raises:
            AlreadyExistsError: the key created another pool (or one since deleted).
        """
        row = await self.db.fetchrow(
            f"SELECT {POOL_COLUMNS}, p.deleted_at {_POOL_FROM} WHERE p.idempotency_key = $1",
            key,
        )
        if row is None:
            return None
        if row["name"] != name or row["deleted_at"] is not None:
            raise AlreadyExistsError(
                f"The idempotency key was used to create pool {row['name']}"
                f"{' (since deleted)' if row['deleted_at'] else ''}; use a new key for a "
                "new request."
            )
        return pool_from_row(row)

    async def _create_pool(  # noqa: PLR0913 - the pool's fields
        self,
        name: str,
        *,
        cidr: str | Prefix | None,
        parent: str | None,
        prefix_length: int | None,
        role: str,
        space: str,
        policy: PoolPolicy | None,
        labels: dict[str, str] | None,
        idempotency_key: str | None,
        ctx: RequestContext,
    ) -> Pool:
        if role not in ROLES:
            raise InvalidRequestError(
                f"role {role!r} is not one of {', '.join(ROLES)}.", field="role"
            )
        policy = policy or PoolPolicy()
        labels = check_labels(labels or {})
        prefix = to_prefix(cidr, "cidr") if cidr is not None else None
        if parent is None:
            if prefix is None:
                raise InvalidRequestError("A root pool needs a cidr.", field="cidr")
            if prefix_length is not None:
                raise InvalidRequestError(
                    "prefix_length is for child pools; give a root pool its cidr.",
                    field="prefix_length",
                )
            violations = check_special_purpose(
                prefix, allow_documentation=policy.allow_documentation
            )
            if violations:
                raise InvalidRequestError(" ".join(v.message for v in violations), field="cidr")
            _check_policy(prefix, policy)
            async with self.db.connection() as conn, conn.transaction():
                space_id = await conn.fetchval(
                    "WITH ins AS (INSERT INTO spaces (name) VALUES ($1) ON CONFLICT DO NOTHING"
                    " RETURNING id) SELECT id FROM ins UNION ALL"
                    " SELECT id FROM spaces WHERE name = $1",
                    check_pool_name(space, "space"),
                )
                pool_id = await self._insert_pool(
                    conn,
                    name=name,
                    cidr=prefix,
                    role=role,
                    policy=policy,
                    labels=labels,
                    ctx=ctx,
                    idempotency_key=idempotency_key,
                    space_id=space_id,
                )
            self.feed.wake()
            return await self.get_pool_by_id(pool_id)
        parent_pool = await self.get_pool(parent)
        await self.outside_clusters(
            parent_pool,
            "kipam lays out and deletes a cluster's pools as one: carve other pools from the "
            "site pool.",
        )
        if (prefix is None) == (prefix_length is None):
            raise InvalidRequestError(
                "A child pool needs exactly one of prefix_length or cidr.", field="prefix_length"
            )
        if space not in ("default", parent_pool.space):
            raise InvalidRequestError("A child pool lives in its parent's space.", field="space")
        if prefix is not None:
            _check_policy(prefix, policy)
        elif prefix_length is not None:
            _check_policy(Prefix(parent_pool.cidr.version, 0, prefix_length), policy)
        loop = asyncio.get_running_loop()
        job = _CreateChild(
            parent_pool.id,
            name,
            role,
            prefix_length,
            prefix,
            policy,
            labels,
            idempotency_key,
            ctx,
            loop.create_future(),
        )
        self._submit(job)
        return await self.get_pool_by_id(await job.future)

    async def _insert_pool(  # noqa: PLR0913
        self,
        conn: asyncpg.Connection,
        *,
        name: str,
        cidr: Prefix,
        role: str,
        policy: PoolPolicy,
        labels: dict[str, str],
        ctx: RequestContext,
        idempotency_key: str | None,
        space_id: int | None = None,
        parent: tuple[int, int] | None = None,
    ) -> int:
        row = await conn.fetchrow(
            """
            WITH ins AS (
                INSERT INTO pools (space_id, name, cidr, role, parent_id, parent_allocation_id,
                                   policy, labels, idempotency_key, revision)
                SELECT coalesce($1, pp.space_id), $2, $3, $4, $5, $6, $7, $8, $13,
                       nextval('kipam_revision')
                  FROM (SELECT 1) one LEFT JOIN pools pp ON pp.id = $5
                RETURNING id, name, cidr, revision
            )
            INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation, prefix,
                                 actor, request_id, trace_id, data)
            SELECT revision, 'pool.created', id, name, 0, cidr, $9, $10, $11, $12 FROM ins
            RETURNING pool_id
            """,
            space_id,
            name,
            cidr,
            role,
            parent[0] if parent else None,
            parent[1] if parent else None,
            policy.to_json(),
            labels,
            ctx.actor,
            ctx.request_id,
            ctx.trace_id,
            {"policy": policy.to_json(), "labels": labels},
            idempotency_key,
        )
        if row is None:  # pragma: no cover - INSERT ... RETURNING
            raise AssertionError(name)
        return int(row["pool_id"])

    async def get_pool(self, name: str) -> Pool:
        """The live pool of that name.

        Raises:
            PoolNotFoundError: none.
        """
        row = await self.db.fetchrow(
            f"SELECT {POOL_COLUMNS} {_POOL_FROM} WHERE p.name = $1 AND p.deleted_at IS NULL",
            check_pool_name(name, "pool"),
        )
        if row is None:
            raise PoolNotFoundError(name)
        return pool_from_row(row)

    async def get_pool_by_id(self, pool_id: int) -> Pool:
        """The live pool with that id."""
        row = await self.db.fetchrow(
            f"SELECT {POOL_COLUMNS} {_POOL_FROM} WHERE p.id = $1 AND p.deleted_at IS NULL", pool_id
        )
        if row is None:
            raise PoolNotFoundError(f"#{pool_id}")
        return pool_from_row(row)

    async def list_pools(  # noqa: PLR0913 - the filters
        self,
        *,
        space: str | None = None,
        role: str | None = None,
        parent: str | None = None,
        selector: str = "",
        family: int | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Pool]:
        """Live pools, by name, filtered; keyset pagination on the name."""
        limit = _check_limit(limit)
        args: list[object] = []
        where = ["p.deleted_at IS NULL"]
        for column, value in (("s.name", space), ("p.role", role), ("pp.name", parent)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if family is not None:
            if family not in (4, 6):
                raise InvalidRequestError("family must be 4 or 6.", field="family")
            args.append(family)
            where.append(f"family(p.cidr) = ${len(args)}")
        where += _selector_sql(parse_selector(selector), "p.labels", args)
        if after is not None:
            args.append(after)
            where.append(f"p.name > ${len(args)}")
        args.append(limit + 1)
        rows = await self.db.fetch(
            f"SELECT {POOL_COLUMNS} {_POOL_FROM} WHERE {' AND '.join(where)}"
            f" ORDER BY p.name LIMIT ${len(args)}",
            *args,
        )
        pools = [pool_from_row(r) for r in rows[:limit]]
        return Page(pools, pools[-1].name if len(rows) > limit else None)

    @traced("delete_pool", pool="name")
    async def delete_pool(self, name: str, *, ctx: RequestContext | None = None) -> None:
        """Delete a pool that holds nothing (active or quarantined). History is kept.

        A child pool's CIDR goes back to its parent (through the parent's quarantine).

        Raises:
            PoolNotFoundError: none.
            PreconditionFailedError: it still holds prefixes or child pools.
        """
        ctx = ctx or RequestContext()
        pool = await self.get_pool(name)
        await self.outside_clusters(pool, "delete the cluster instead (kipam cluster delete).")
        if pool.parent is not None:
            parent = await self.get_pool(pool.parent)
            job = _DeleteChild(parent.id, pool.id, ctx, asyncio.get_running_loop().create_future())
            self._submit(job)
            await job.future
            return
        async with self.db.connection() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT id FROM pools WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", pool.id
            )
            if locked is None:
                raise PoolNotFoundError(name)
            error = await self._check_empty(conn, pool.id, name)
            if error is not None:
                raise error
            await self._mark_deleted(conn, pool.id, name, ctx)
        self.feed.wake()

    async def outside_clusters(self, pool: Pool, advice: str) -> None:
        """Refuse a pool that is a live cluster's block or role pool.

        Raises:
            PreconditionFailedError: it is; the message names the cluster, then ``advice``.
        """
        row = await self.db.fetchrow(
            "SELECT k.name FROM clusters k JOIN pools p ON p.id = $1 WHERE k.deleted_at IS NULL"
            " AND (p.id IN (k.block_pool_id, k.ipv4_block_pool_id)"
            "      OR p.parent_id IN (k.block_pool_id, k.ipv4_block_pool_id))",
            pool.id,
        )
        if row is not None:
            raise PreconditionFailedError(
                f"Pool {pool.name} belongs to cluster {row['name']}; {advice}"
            )

    async def _check_empty(
        self, conn: asyncpg.Connection, pool_id: int, name: str
    ) -> ServiceError | None:
        held = await conn.fetchval(
            "SELECT count(*) FROM allocations WHERE pool_id = $1"
            " AND (state = 'active' OR (state = 'quarantined' AND reusable_at > now()))",
            pool_id,
        )
        if held:
            return PreconditionFailedError(
                f"Pool {name} still holds {held} prefix(es) (active or in quarantine); release "
                "them, and wait out the quarantine, before deleting it."
            )
        return None

    async def _mark_deleted(
        self, conn: asyncpg.Connection, pool_id: int, name: str, ctx: RequestContext
    ) -> None:
        await conn.execute(
            """
            WITH upd AS (
                UPDATE pools SET deleted_at = now(), generation = generation + 1
                 WHERE id = $1 RETURNING id, name, cidr, generation
            )
            INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation, prefix,
                                 actor, request_id, trace_id)
            SELECT nextval('kipam_revision'), 'pool.deleted', id, name, generation, cidr,
                   $2, $3, $4 FROM upd
            """,
            pool_id,
            ctx.actor,
            ctx.request_id,
            ctx.trace_id,
        )
        self.engines.discard(pool_id)
        self._pools.pop(name, None)
        _log.info("pool %s deleted by %s", name, ctx.actor)

    # -- allocations -----------------------------------------------------------------------------

    @traced("allocate", pool="pool", owner="owner", prefix_length="length", dry_run="dry_run")
    async def allocate(  # noqa: PLR0913 - the request's fields
        self,
        pool: str,
        *,
        owner: str,
        length: int | None = None,
        prefix: str | Prefix | None = None,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        dry_run: bool = False,
        ctx: RequestContext | None = None,
    ) -> tuple[Allocation, bool]:
        """Allocate one prefix: the next free one of ``length``, or exactly ``prefix``.

        Returns:
            The allocation and whether it was created now (False: an idempotent replay). A dry
            run returns what would be allocated, with id 0, and writes nothing.

        Raises:
            InvalidRequestError, PolicyViolationError: a bad request.
            PoolNotFoundError: no such pool.
            PoolExhaustedError: nothing of that length is free.
            PrefixConflictError, AlreadyExistsError: the exact prefix is taken; the key was used
                for a different request.
            UnavailableError: the database or the lock did not answer in time.
        """
        request = _request(owner, length, prefix, labels, idempotency_key)
        [answer] = await self._allocate(
            pool, [request], dry_run=dry_run, ctx=ctx or RequestContext()
        )
        return answer

    @traced("allocate_many", pool="pool", dry_run="dry_run")
    async def allocate_many(
        self,
        pool: str,
        requests: Sequence[AllocationRequest],
        *,
        dry_run: bool = False,
        ctx: RequestContext | None = None,
    ) -> list[tuple[Allocation, bool]]:
        """Allocate several prefixes from one pool, all or nothing, in one transaction."""
        ctx = ctx or RequestContext()
        if not requests:
            raise InvalidRequestError("A batch needs at least one request.", field="requests")
        if len(requests) > MAX_BATCH:
            raise InvalidRequestError(
                f"A batch holds at most {MAX_BATCH} requests, not {len(requests)}.",
                field="requests",
            )
        requests = [
            _request(r.owner, r.length, r.prefix, r.labels, r.idempotency_key) for r in requests
        ]
        return await self._allocate(pool, requests, dry_run=dry_run, ctx=ctx)

    async def _allocate(
        self,
        pool: str,
        requests: list[AllocationRequest],
        *,
        dry_run: bool,
        ctx: RequestContext,
    ) -> list[tuple[Allocation, bool]]:
        """allocate_many for validated requests; retried once if the cached pool was deleted."""
        target = await self._target(pool)
        for request in requests:
            if request.prefix is not None and request.prefix.version != target.cidr.version:
                raise InvalidRequestError(
                    f"{request.prefix} is IPv{request.prefix.version}; pool {pool} is "
                    f"IPv{target.cidr.version}.",
                    field="prefix",
                )
        if not dry_run and all(r.idempotency_key for r in requests):
            replay = await self._replays(target, requests)
            if replay is not None:
                return replay
        job = _Allocate(
            target.id, requests, dry_run, ctx, asyncio.get_running_loop().create_future()
        )
        self._submit(job)
        try:
            answers = await job.future
        except PoolNotFoundError:
            # Deleted (maybe re-created under the same name) since it was cached.
            if self._pools.pop(pool, None) is None:
                raise
            return await self._allocate(pool, requests, dry_run=dry_run, ctx=ctx)
        except InvalidError as exc:  # the engine refused a request: name its field
            raise InvalidRequestError(exc.message, field=_field_of(exc, requests)) from exc
        return [
            (_preview(target, request, item), created)
            for request, (item, created) in zip(requests, answers, strict=True)
        ]

    async def _target(self, name: str) -> Pool:
        """The pool to write to, cached by name: its id, CIDR and policy never change."""
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = await self.get_pool(name)
        return pool

    async def _replays(
        self, pool: Pool, requests: Sequence[AllocationRequest]
    ) -> list[tuple[Allocation, bool]] | None:
        """Step 1 of the path: every key already used? Then answer without any lock."""
        rows = await self.db.fetch(
            f"SELECT {ALLOCATION_COLUMNS} {_ALLOCATION_FROM}"
            " WHERE a.pool_id = $1 AND a.idempotency_key = ANY($2::text[])",
            pool.id,
            [r.idempotency_key for r in requests],
        )
        if len(rows) < len({r.idempotency_key for r in requests}):
            return None
        found = {r["idempotency_key"]: allocation_from_row(r) for r in rows}
        return [(_replay(found[cast("str", r.idempotency_key)], r), False) for r in requests]

    @traced("release")
    async def release(self, allocation_id: int, *, ctx: RequestContext | None = None) -> Allocation:
        """Release an allocation: to quarantine, or released at once if the pool has none.

        Idempotent: releasing again returns the allocation in its current state.

        Raises:
            AllocationNotFoundError: no such allocation.
            PreconditionFailedError: it is a live child pool's CIDR.
        """
        ctx = ctx or RequestContext()
        row = await self.db.fetchrow(_POOL_OF_ALLOCATION, _check_id(allocation_id))
        if row is None:
            raise AllocationNotFoundError(allocation_id)
        job = _Release(
            row["pool_id"], allocation_id, ctx, asyncio.get_running_loop().create_future()
        )
        self._submit(job)
        return await job.future

    async def pool_of(self, allocation_id: int) -> str:
        """The name of the pool an allocation was taken from (for authorization).

        Raises:
            AllocationNotFoundError: no such allocation.
        """
        row = await self.db.fetchrow(
            "SELECT pool_name FROM changes"
            " WHERE allocation_id = $1 AND kind = 'allocation.created'",
            _check_id(allocation_id),
        )
        if row is None:
            raise AllocationNotFoundError(allocation_id)
        return str(row["pool_name"])

    async def get_allocation(self, allocation_id: int) -> Allocation:
        """One allocation, in any state."""
        row = await self.db.fetchrow(
            f"SELECT {ALLOCATION_COLUMNS} {_ALLOCATION_FROM}"
            f" WHERE a.pool_id = ({_POOL_OF_ALLOCATION}) AND a.id = $1",
            _check_id(allocation_id),
        )
        if row is None:
            raise AllocationNotFoundError(allocation_id)
        return allocation_from_row(row)

    async def list_allocations(  # noqa: PLR0913 - the filters
        self,
        *,
        pool: str | None = None,
        owner: str | None = None,
        selector: str = "",
        state: str | None = None,
        family: int | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Allocation]:
        """Allocations, oldest first, filtered; keyset pagination on the id."""
        limit = _check_limit(limit)
        args: list[object] = []
        where: list[str] = []
        if pool is not None:
            args.append((await self.get_pool(pool)).id)
            where.append(f"a.pool_id = ${len(args)}")
        if owner is not None:
            args.append(owner)
            where.append(f"a.owner = ${len(args)}")
        if state is not None:
            if state not in STATES:
                raise InvalidRequestError(
                    f"state must be one of {', '.join(STATES)}.", field="state"
                )
            args.append(state)
            where.append(f"a.state = ${len(args)}")
        if family is not None:
            if family not in (4, 6):
                raise InvalidRequestError("family must be 4 or 6.", field="family")
            args.append(family)
            where.append(f"family(a.prefix) = ${len(args)}")
        where += _selector_sql(parse_selector(selector), "a.labels", args)
        return await self._page(
            f"SELECT {ALLOCATION_COLUMNS} {_ALLOCATION_FROM}",
            "a.id",
            where,
            args,
            after=after,
            limit=limit,
            convert=allocation_from_row,
            key_of=lambda a: a.id,
        )

    async def lookup(
        self, address: str | Prefix, *, at: dt.datetime | None = None
    ) -> list[Allocation]:
        """Allocations holding ``address`` now (or at ``at``), innermost first.

        ``address`` is text, or a host prefix from :func:`service.models.to_address`. An
        allocation holds its prefix from creation until it is released; quarantine and
        release are both the end of the holding.
        """
        ip = address if isinstance(address, Prefix) else to_address(address)
        if at is None:
            rows = await self.db.fetch(
                f"SELECT {ALLOCATION_COLUMNS} {_HELD_FROM}"
                f" WHERE {_HELD_WHERE} AND c.prefix >>= $1::cidr AND a.state = 'active'"
                " ORDER BY masklen(a.prefix) DESC, a.id",
                ip,
            )
        else:
            at = _check_time(at, "at")
            rows = await self.db.fetch(
                f"SELECT {ALLOCATION_COLUMNS} {_HELD_FROM}"
                f" WHERE {_HELD_WHERE} AND c.prefix >>= $1::cidr AND a.created_at <= $2"
                " AND (a.released_at IS NULL OR a.released_at > $2)"
                " ORDER BY masklen(a.prefix) DESC, a.id",
                ip,
                at,
            )
        return [allocation_from_row(r) for r in rows]

    async def usage(self, pool: str, *, length: int | None = None) -> PoolUsage:
        """How full a pool is, from its engine (no table scan)."""
        target = await self.get_pool(pool)
        async with self._current_engine(target.id) as (conn, engine):
            quarantined = await conn.fetchval(
                "SELECT count(*) FROM allocations WHERE pool_id = $1 AND state = 'quarantined'",
                target.id,
            )
            try:
                usage = engine.usage(length)
            except EngineError as exc:
                raise InvalidRequestError(exc.message, field="length") from exc
        return PoolUsage(
            pool=target.name,
            cidr=target.cidr,
            total=usage.total,
            allocated=usage.allocated,
            reserved=usage.reserved,
            free=usage.free,
            allocations=usage.allocations,
            quarantined=int(quarantined),
            length=length,
            free_blocks=usage.free_blocks,
            largest_free=usage.largest_free,
            fragmentation=usage.fragmentation,
            utilization=usage.utilization,
        )

    async def available(
        self, pool: str, *, length: int | None = None, limit: int = 100
    ) -> list[Prefix]:
        """The first free prefixes of ``length`` in address order (what could be taken now)."""
        limit = _check_limit(limit)
        target = await self.get_pool(pool)
        async with self._current_engine(target.id) as (_, engine):
            return engine.available(length, limit)

    async def history(
        self,
        *,
        prefix: str | None = None,
        pool: str | None = None,
        since: dt.datetime | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Change]:
        """Changes touching ``prefix`` (overlapping it) and/or in ``pool``, oldest first.

        ``since`` keeps changes made at or after that time; pages go by revision (``after``).
        """
        limit = _check_limit(limit)
        args: list[object] = []
        where: list[str] = []
        if prefix is not None:
            args.append(to_prefix(prefix, "prefix"))
            where.append(f"c.prefix && ${len(args)}::cidr")
        if pool is not None:
            args.append(check_pool_name(pool, "pool"))
            where.append(f"c.pool_name = ${len(args)}")
        if since is not None:
            args.append(_check_time(since, "since"))
            where.append(f"c.at >= ${len(args)}")
        return await self._page(
            f"SELECT {CHANGE_COLUMNS} {_CHANGE_FROM}",
            "c.revision",
            where,
            args,
            after=after,
            limit=limit,
            convert=change_from_row,
            key_of=lambda c: c.revision,
        )

    async def _page(  # noqa: PLR0913 - one query's parts
        self,
        select: str,
        key: str,
        where: list[str],
        args: list[object],
        *,
        after: str | None,
        limit: int,
        convert: Callable[[asyncpg.Record], T],
        key_of: Callable[[T], int],
    ) -> Page[T]:
        """One page of a keyset-paginated list: rows after ``after`` by the integer ``key``."""
        if after is not None:
            if not after.isdigit():
                raise InvalidRequestError("The page cursor is not valid.", field="after")
            args.append(int(after))
            where.append(f"{key} > ${len(args)}")
        args.append(limit + 1)
        rows = await self.db.fetch(
            f"{select} {'WHERE ' + ' AND '.join(where) if where else ''}"
            f" ORDER BY {key} LIMIT ${len(args)}",
            *args,
        )
        items = [convert(r) for r in rows[:limit]]
        return Page(items, str(key_of(items[-1])) if len(rows) > limit else None)

    def watch(
        self, since_revision: int | None = None, pool: str | None = None
    ) -> AsyncGenerator[Change, None]:
        """Every change after ``since_revision``, then live (see :mod:`service.feed`)."""
        return self.feed.watch(since_revision, pool)

    @contextlib.asynccontextmanager
    async def _current_engine(
        self, pool_id: int
    ) -> AsyncIterator[tuple[asyncpg.Connection, PoolAllocator]]:
        """The pool's engine at the pool row's generation, guarded by the pool's mutex."""
        async with self.engines.mutex(pool_id), self.db.connection() as conn:
            generation = await conn.fetchval("SELECT generation FROM pools WHERE id = $1", pool_id)
            yield conn, await self.engines.fresh(conn, pool_id, generation)


# -- helpers ---------------------------------------------------------------------------------


def _field_of(error: EngineError, requests: Sequence[AllocationRequest]) -> str:
    """The request field an engine error is about (``requests[i].`` in a batch)."""
    index = error.batch_index or 0
    name = "prefix" if requests[index].prefix is not None else "prefix_length"
    return f"requests[{index}].{name}" if len(requests) > 1 else name


def _check_key(idempotency_key: str) -> None:
    if not 1 <= len(idempotency_key) <= 256 or CONTROL.search(idempotency_key):
        raise InvalidRequestError(
            "An idempotency key has 1 to 256 characters, none of them control characters.",
            field="idempotency_key",
        )


def _check_time(value: dt.datetime, field_name: str) -> dt.datetime:
    """A time with a zone, in UTC (one that has no UTC equivalent is refused)."""
    if value.tzinfo is None:
        raise InvalidRequestError(f"{field_name} needs a time zone (e.g. ...Z).", field=field_name)
    try:
        return value.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise InvalidRequestError(
            f"{field_name} {value.isoformat()} is outside the times kipam can compare.",
            field=field_name,
        ) from None


def _check_id(allocation_id: int) -> int:
    if not 1 <= allocation_id < 2**63:
        raise InvalidRequestError(
            f"{allocation_id!r} is not an allocation id (a positive integer).", field="id"
        )
    return allocation_id


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequestError(f"limit must be from 1 to {MAX_PAGE}.", field="limit")
    return limit


def _check_policy(cidr: Prefix, policy: PoolPolicy) -> None:
    """Build a throwaway engine: it checks lengths, alignment and reserved ranges for us."""
    try:
        PoolAllocator(cidr, policy.engine_policy())
    except EngineError as exc:
        raise InvalidRequestError(exc.message, field="policy") from exc
    if policy.quarantine_seconds < 0 or policy.quarantine_seconds > 10 * 365 * 86400:
        raise InvalidRequestError(
            "quarantine_seconds must be from 0 to ten years.", field="policy.quarantine_seconds"
        )


def _request(
    owner: str,
    length: int | None,
    prefix: str | Prefix | None,
    labels: dict[str, str] | None,
    idempotency_key: str | None,
) -> AllocationRequest:
    if length is not None and prefix is not None:
        raise InvalidRequestError("Give either prefix_length or prefix, not both.", field="prefix")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        raise InvalidRequestError("prefix_length must be an integer.", field="prefix_length")
    if idempotency_key is not None:
        _check_key(idempotency_key)
    return AllocationRequest(
        owner=check_owner(owner),
        length=length,
        prefix=to_prefix(prefix, "prefix") if prefix is not None else None,
        labels=check_labels(labels or {}),
        idempotency_key=idempotency_key,
    )


def _answer(
    decided: list[object], inserted: dict[tuple[int, Prefix], Allocation], pool_id: int
) -> list[tuple[Allocation | Prefix, bool]] | BaseException:
    """One allocate job's answer once its rows are written (prefixes stay prefixes in a dry run)."""
    if len(decided) == 1 and isinstance(decided[0], BaseException):
        return decided[0]
    out: list[tuple[Allocation | Prefix, bool]] = []
    for item in decided:
        if isinstance(item, Allocation):
            out.append((item, False))
        elif isinstance(item, Prefix):
            out.append((inserted.get((pool_id, item), item), True))
        elif isinstance(item, tuple):  # a key used twice in one batch: the first one's row
            key = item[1]
            first = next(
                a for (pid, _), a in inserted.items() if pid == pool_id and a.idempotency_key == key
            )
            out.append((first, False))
        else:  # pragma: no cover
            raise TypeError(item)
    return out


def _preview(pool: Pool, request: AllocationRequest, decided: Allocation | Prefix) -> Allocation:
    """The allocation for an answer; a dry run's prefix becomes one with id 0, unsaved."""
    if isinstance(decided, Allocation):
        return decided
    now = dt.datetime.now(dt.UTC)
    return Allocation(
        id=0,
        pool=pool.name,
        prefix=decided,
        owner=request.owner,
        labels=request.labels,
        state="active",
        created_at=now,
        released_at=None,
        reusable_at=None,
        revision=0,
        idempotency_key=request.idempotency_key,
    )
