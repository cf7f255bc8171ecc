"""Scaling of the "no two held allocations of a pool overlap" constraint in PostgreSQL.

Question: which in-database overlap guarantee keeps the cost of one allocation INSERT flat
(within 2x) from 10**4 to 10**6 held allocations, with one pool and with 16 pools?

Designs (all on the same table shape; ``held`` means ``state <> 'released'``):

* ``base``  no overlap guarantee: primary key + btree (pool_id, prefix). The floor.
* ``A``     ``EXCLUDE USING gist (pool_id WITH =, prefix inet_ops WITH &&)`` (btree_gist).
* ``B``     LIST partitions by pool_id, each with ``EXCLUDE USING spgist (prefix inet_ops WITH &&)``
            (PostgreSQL 15 cannot declare it on the partitioned parent).
* ``C``     one table, ``EXCLUDE USING spgist ((kipam_span_numeric(pool_id, prefix)) WITH &&)``:
            a numrange [(2*pool + v6) * 2**128 + first address, ... + last address], plus a
            plain SP-GiST index on prefix for address lookups.
* ``Cg``    the same numrange under GiST range_ops.
* ``D``     like C, but the span is a range over bytea: pool_id (4 bytes, big endian) ||
            family byte || address bytes, built with int4send/inet_send (no arithmetic).
* ``Dg``    D under GiST (bytea has no subtype_diff, so GiST's penalty is blind).

Default: base, A, B, C, Cg. ``--cap`` stops A at 10**5 (its cost per row grows with the rows
held: COPY to 10**6, or ADD CONSTRAINT afterwards, takes about 10 min per build) and C in
address order at 10**5 (the SP-GiST range quad tree degenerates when keys arrive sorted).

Workload: /64s inside pools fd00:K::/32 (K = 1..pools), in address order (the allocator hands
out the lowest free prefix; with 16 pools round-robin over the pools) or at random. Each size
is reached by COPY into the table with its constraint in place (timed: building from history);
when that would take longer than ``--max-stage-seconds`` the constraint is dropped, the rest
copied and the constraint added again (the report says so). At each size, after VACUUM ANALYZE
and CHECKPOINT, ``--inserts`` single-row prepared INSERTs (each its own transaction, via
asyncpg) are timed, then deleted and vacuumed away; ``--reps`` times. Sessions run with
``synchronous_commit = off`` by default so the fsync of each commit (about 0.3-1 ms here, the
same for every design) does not hide the constraint's cost.

Also measured: address lookups across all pools (``prefix >>= $1``) on every design at the
largest size, and on B with 16, 300 and 1000 partitions (planning, execution, relation locks
taken); the SQLSTATE and DETAIL of a violation for each design; the inet -> numeric and
inet -> bytea encodings against Python's ipaddress.

Usage: ``python bench/pg_constraint_scaling.py [--dsn DSN] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/kipam_constraint_bench"
TABLE = "allocations"
CONSTRAINT = "allocations_no_overlap"

# ---------------------------------------------------------------- SQL

FUNCTIONS_SQL = r"""
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- inet -> numeric, exact for the whole 128-bit range. A plain (non-STRICT) one-expression SQL
-- function, so the planner inlines it into the index expression (STRICT would prevent that and
-- costs about 4 us per call). IPv4 uses inet subtraction; IPv6 reads the 16 address bytes of
-- inet_send() as two 64-bit halves (bit(64)::bigint is signed: add 2**64 when the top bit is 1).
CREATE OR REPLACE FUNCTION kipam_inet_numeric(a inet) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN family(a) = 4 THEN (a - '0.0.0.0'::inet)::numeric
  ELSE ('x' || encode(substr(inet_send(a), 5, 8), 'hex'))::bit(64)::bigint::numeric
         * 18446744073709551616
       + CASE WHEN get_byte(inet_send(a), 4) >= 128
              THEN 340282366920938463463374607431768211456 ELSE 0 END
       + ('x' || encode(substr(inet_send(a), 13, 8), 'hex'))::bit(64)::bigint::numeric
       + CASE WHEN get_byte(inet_send(a), 12) >= 128 THEN 18446744073709551616 ELSE 0 END
  END $$;

-- [first, last] address of p, shifted into a slot of 2**128 per (pool, family):
-- slot = 2 * pool_id + (1 if IPv6 else 0), so pools and families never collide.
CREATE OR REPLACE FUNCTION kipam_span_numeric(pool_id integer, p inet) RETURNS numrange
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT numrange(
    (pool_id::numeric * 2 + (family(p) = 6)::int) * 340282366920938463463374607431768211456
      + kipam_inet_numeric(network(p)),
    (pool_id::numeric * 2 + (family(p) = 6)::int) * 340282366920938463463374607431768211456
      + kipam_inet_numeric(broadcast(p)),
    '[]') $$;

DO $$ BEGIN
  CREATE TYPE kipam_byterange AS RANGE (subtype = bytea);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- Same idea without arithmetic: bytea compares as unsigned bytes, then by length, so
-- pool_id (4 bytes, big endian) || family byte (2 = IPv4, 3 = IPv6) || address bytes orders
-- by pool, then family, then address. inet_send() is: family, bits, is_cidr, length, address.
CREATE OR REPLACE FUNCTION kipam_span_bytes(pool_id integer, p inet) RETURNS kipam_byterange
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT kipam_byterange(
    int4send(pool_id) || substr(inet_send(network(p)), 1, 1) || substr(inet_send(network(p)), 5),
    int4send(pool_id) || substr(inet_send(broadcast(p)), 1, 1)
      || substr(inet_send(broadcast(p)), 5),
    '[]') $$;
"""

COLUMNS = """
    id bigserial,
    pool_id integer NOT NULL,
    prefix cidr NOT NULL,
    owner text NOT NULL,
    state text NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'quarantined', 'released')),
    created_at timestamptz NOT NULL DEFAULT now()"""

NO_AUTOVACUUM = "WITH (autovacuum_enabled = off)"  # the script vacuums at fixed points


@dataclass(frozen=True)
class Design:
    """One way to store allocations, with or without the overlap guarantee."""

    key: str
    title: str
    exclusion: str | None  # EXCLUDE clause on the table (None: none, or per partition)
    extra: tuple[str, ...] = ()  # further DDL (indexes) after CREATE TABLE
    partitioned: bool = False
    probe: str | None = None  # the index search the exclusion check does, as a WHERE clause

    def ddl(self, pools: int) -> list[str]:
        """Statements that create the empty table for `pools` pools."""
        if self.partitioned:
            stmts = [
                (
                    f"CREATE TABLE {TABLE} ({COLUMNS},\n    PRIMARY KEY (id, pool_id)) "
                    "PARTITION BY LIST (pool_id)"
                )
            ]
            for k in range(1, pools + 1):
                stmts += partition_ddl(TABLE, k)
            return stmts
        stmts = [f"CREATE TABLE {TABLE} ({COLUMNS},\n    PRIMARY KEY (id)) {NO_AUTOVACUUM}"]
        if self.exclusion:
            stmts.append(f"ALTER TABLE {TABLE} ADD CONSTRAINT {CONSTRAINT} {self.exclusion}")
        return stmts + list(self.extra)


def partition_ddl(table: str, pool: int) -> list[str]:
    """One pool's partition with its own SP-GiST exclusion constraint (design B)."""
    part = f"{table}_p{pool}"
    return [
        f"CREATE TABLE {part} PARTITION OF {table} FOR VALUES IN ({pool}) {NO_AUTOVACUUM}",
        (
            f"ALTER TABLE {part} ADD CONSTRAINT {part}_no_overlap "
            "EXCLUDE USING spgist (prefix inet_ops WITH &&) WHERE (state <> 'released')"
        ),
    ]


HELD = "WHERE (state <> 'released')"
SPAN_PROBE = "{fn}(pool_id, prefix) && {fn}($1, $2::cidr)"
DESIGNS = {
    d.key: d
    for d in (
        Design(
            "base",
            "none (btree pool_id, prefix)",
            None,
            (f"CREATE INDEX allocations_pool_prefix ON {TABLE} (pool_id, prefix)",),
        ),
        Design(
            "A",
            "gist (pool_id =, inet &&)",
            f"EXCLUDE USING gist (pool_id WITH =, prefix inet_ops WITH &&) {HELD}",
            probe="pool_id = $1 AND prefix && $2::cidr",
        ),
        Design(
            "B",
            "partition per pool, spgist inet &&",
            None,
            partitioned=True,
            probe="pool_id = $1 AND prefix && $2::cidr",
        ),
        Design(
            "C",
            "spgist numrange span + spgist prefix",
            f"EXCLUDE USING spgist ((kipam_span_numeric(pool_id, prefix)) WITH &&) {HELD}",
            (f"CREATE INDEX allocations_prefix ON {TABLE} USING spgist (prefix inet_ops)",),
            probe=SPAN_PROBE.format(fn="kipam_span_numeric"),
        ),
        Design(
            "Cg",
            "gist numrange span + spgist prefix",
            f"EXCLUDE USING gist ((kipam_span_numeric(pool_id, prefix)) WITH &&) {HELD}",
            (f"CREATE INDEX allocations_prefix ON {TABLE} USING spgist (prefix inet_ops)",),
            probe=SPAN_PROBE.format(fn="kipam_span_numeric"),
        ),
        Design(
            "D",
            "spgist bytea span + spgist prefix",
            f"EXCLUDE USING spgist ((kipam_span_bytes(pool_id, prefix)) WITH &&) {HELD}",
            (f"CREATE INDEX allocations_prefix ON {TABLE} USING spgist (prefix inet_ops)",),
            probe=SPAN_PROBE.format(fn="kipam_span_bytes"),
        ),
        Design(
            "Dg",
            "gist bytea span + spgist prefix",
            f"EXCLUDE USING gist ((kipam_span_bytes(pool_id, prefix)) WITH &&) {HELD}",
            (f"CREATE INDEX allocations_prefix ON {TABLE} USING spgist (prefix inet_ops)",),
            probe=SPAN_PROBE.format(fn="kipam_span_bytes"),
        ),
    )
}

INSERT_SQL = "INSERT INTO allocations (pool_id, prefix, owner) VALUES ($1, $2, $3) RETURNING id"
# The table itself, or its partitions (pg_partition_tree returns nothing for a plain table).
LEAVES = (
    "SELECT $1::regclass AS relid "
    "UNION ALL SELECT relid FROM pg_partition_tree($1::regclass) WHERE isleaf"
)
# Held allocations containing an address, across all pools. Without the state filter no
# partial (WHERE state <> 'released') index qualifies: A and B would need another index.
LOOKUP_SQL = (
    "SELECT id, pool_id, prefix, state FROM {table} "
    "WHERE prefix >>= $1::inet AND state <> 'released'"
)

# ---------------------------------------------------------------- workload


def slash64(pool: int, index: int) -> str:
    """The index-th /64 of pool fd00:POOL::/32, as text."""
    return f"fd00:{pool:x}:{index >> 16:x}:{index & 0xFFFF:x}::/64"


def address_in(prefix: str) -> str:
    """An address inside a /64 given as text by slash64."""
    return prefix.replace("::/64", "::1")


def workload(pools: int, order: str, n: int, seed: int) -> list[tuple[int, str]]:
    """The first n allocations (pool, /64) in the order the service would make them."""
    if order == "inorder":  # lowest first in each pool, the pools taking turns
        return [(1 + j % pools, slash64(1 + j % pools, j // pools)) for j in range(n)]
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, str]] = []
    while len(out) < n:
        pool, index = rng.randrange(pools) + 1, rng.getrandbits(32)
        if (pool, index) not in seen:
            seen.add((pool, index))
            out.append((pool, slash64(pool, index)))
    return out


# ---------------------------------------------------------------- helpers


async def connect(dsn: str, sync_commit: str) -> asyncpg.Connection[Any]:
    """A session with the benchmark's settings."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(
        dsn, server_settings={"synchronous_commit": sync_commit}, command_timeout=3600
    )
    return conn


async def reset(conn: asyncpg.Connection[Any]) -> None:
    """Drop every table this script creates.

    Partitions are dropped one per transaction first: dropping a parent with 1000 partitions
    in one statement needs more locks than the default lock table holds ("out of shared
    memory", max_locks_per_transaction = 64).
    """
    for name in await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent "
        "WHERE p.relname = 'allocations' OR p.relname LIKE 'lk\\_%'"
    ):
        await conn.execute(f"DROP TABLE IF EXISTS {name['relname']}")
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE} CASCADE")
    for name in await conn.fetch(
        "SELECT relname FROM pg_class WHERE relname LIKE 'lk\\_%' AND relkind = 'p'"
    ):
        await conn.execute(f"DROP TABLE IF EXISTS {name['relname']} CASCADE")


async def create(conn: asyncpg.Connection[Any], design: Design, pools: int) -> None:
    """Drop and recreate the allocations table for one design."""
    await reset(conn)
    async with conn.transaction():
        for stmt in design.ddl(pools):
            await conn.execute(stmt)


async def copy_rows(conn: asyncpg.Connection[Any], rows: Sequence[tuple[int, str]]) -> None:
    """Bulk-load rows with COPY (binary), through the table and its constraints."""
    await conn.copy_records_to_table(
        TABLE,
        records=[(pool, prefix, f"node/w{pool}") for pool, prefix in rows],
        columns=["pool_id", "prefix", "owner"],
    )


async def sizes(conn: asyncpg.Connection[Any]) -> dict[str, int]:
    """Bytes on disk: heap (with TOAST), exclusion index, other indexes, total."""
    leaves = LEAVES
    heap = await conn.fetchval(
        f"SELECT sum(pg_table_size(relid))::bigint FROM ({leaves}) l",  # noqa: S608
        TABLE,
    )
    rows = await conn.fetch(
        f"""SELECT pg_relation_size(i.indexrelid) AS bytes, c.contype = 'x' AS excl
            FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid
            WHERE i.indrelid IN ({leaves})""",  # noqa: S608
        TABLE,
    )
    excl = sum(r["bytes"] for r in rows if r["excl"])
    other = sum(r["bytes"] for r in rows if not r["excl"])
    return {
        "heap": heap,
        "exclusion_index": excl,
        "other_indexes": other,
        "total": heap + excl + other,
    }


async def constraint_defs(conn: asyncpg.Connection[Any]) -> list[str]:
    """Definitions (and access method) of the exclusion constraints on the table's leaves."""
    rows = await conn.fetch(
        f"""SELECT DISTINCT am.amname || ': ' || regexp_replace(pg_get_constraintdef(c.oid),
                   '_p[0-9]+', '_pN') AS def
            FROM pg_constraint c JOIN pg_class ic ON ic.oid = c.conindid
            JOIN pg_am am ON am.oid = ic.relam
            WHERE c.contype = 'x' AND c.conrelid IN ({LEAVES})""",  # noqa: S608
        TABLE,
    )
    return sorted(r["def"] for r in rows)


def med(values: Sequence[float]) -> float:
    """Median."""
    return statistics.median(values)


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- scaling runs


@dataclass
class Build:
    """State of one (design, pools, order) table while it grows."""

    conn: asyncpg.Connection[Any]
    design: Design
    rows: list[tuple[int, str]]
    loaded: int = 0
    max_id: int = 0
    loads: list[dict[str, Any]] = field(default_factory=list)


async def load_to(build: Build, target: int, max_seconds: float) -> None:
    """COPY the next rows up to `target`; rebuild the constraint if that would be too slow."""
    conn, design = build.conn, build.design
    start, method = time.perf_counter(), "copy with constraint"
    chunk = max(5_000, (target - build.loaded) // 20)
    while build.loaded < target:
        t0 = time.perf_counter()
        end = min(target, build.loaded + chunk)
        await copy_rows(conn, build.rows[build.loaded : end])
        per_row = (time.perf_counter() - t0) / (end - build.loaded)
        build.loaded = end
        # If the cost per row grows linearly with the rows held (A does), the rest costs:
        remaining = per_row * (target**2 - build.loaded**2) / (2 * build.loaded)
        spent = time.perf_counter() - start
        if design.exclusion and build.loaded < target and spent + remaining > max_seconds:
            method = await rebuild_rest(build, target)
    seconds = time.perf_counter() - start
    rows = target - (build.loads[-1]["to"] if build.loads else 0)
    build.loads.append(
        {"to": target, "rows": rows, "seconds": seconds, "us_per_row": seconds / rows * 1e6}
        | {"method": method}
    )
    build.max_id = await conn.fetchval(f"SELECT max(id) FROM {TABLE}")  # noqa: S608
    print(f"    loaded {target:>9,}: {seconds:7.1f} s ({method})", flush=True)


async def rebuild_rest(build: Build, target: int) -> str:
    """Drop the exclusion constraint, COPY the rest, add the constraint again (timed)."""
    conn, design = build.conn, build.design
    dropped_at = build.loaded
    before = await constraint_defs(conn)
    await conn.execute(f"ALTER TABLE {TABLE} DROP CONSTRAINT {CONSTRAINT}")
    t0 = time.perf_counter()
    await copy_rows(conn, build.rows[build.loaded : target])
    copied = time.perf_counter() - t0
    t0 = time.perf_counter()
    await conn.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {CONSTRAINT} {design.exclusion}")
    added = time.perf_counter() - t0
    after = await constraint_defs(conn)
    if before != after:
        raise AssertionError(("constraint changed on rebuild", before, after))
    build.loaded = target
    return (
        f"constraint dropped at {dropped_at:,}; COPY {copied:.1f} s; "
        f"ADD CONSTRAINT {added:.1f} s (same definition: {after[0]})"
    )


async def settle(conn: asyncpg.Connection[Any]) -> None:
    """Vacuum, analyze and checkpoint so every measurement starts from the same state."""
    await conn.execute(f"VACUUM ANALYZE {TABLE}")
    await conn.execute("CHECKPOINT")


async def time_inserts(build: Build, probes: Sequence[tuple[int, str]]) -> list[float]:
    """Insert each probe in its own transaction; return microseconds per insert."""
    stmt = await build.conn.prepare(INSERT_SQL)
    out = []
    for pool, prefix in probes:
        t0 = time.perf_counter_ns()
        await stmt.fetchval(pool, prefix, "node/probe")
        out.append((time.perf_counter_ns() - t0) / 1e3)
    await build.conn.execute(f"DELETE FROM {TABLE} WHERE id > $1", build.max_id)  # noqa: S608
    await build.conn.execute(f"VACUUM {TABLE}")
    return out


async def probe_cost(build: Build, probes: Sequence[tuple[int, str]]) -> dict[str, float] | None:
    """Buffers and time of the index search an exclusion check makes (EXPLAIN ANALYZE)."""
    if build.design.probe is None:
        return None
    sql = (
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT 1 FROM "  # noqa: S608
        f"{TABLE} WHERE {build.design.probe} AND state <> 'released'"
    )
    buffers, times, nodes = [], [], set()
    async with build.conn.transaction():
        await build.conn.execute("SET LOCAL enable_seqscan = off")
        for pool, prefix in probes:
            plan = json.loads(await build.conn.fetchval(sql, pool, prefix))[0]
            top = plan["Plan"]
            buffers.append(top["Shared Hit Blocks"] + top["Shared Read Blocks"])
            times.append(plan["Execution Time"] * 1e3)
            nodes |= plan_nodes(top)
    return {"buffers": med(buffers), "exec_us": med(times), "plan_nodes": sorted(nodes)}


async def server_insert_cost(build: Build, probes: Sequence[tuple[int, str]]) -> float:
    """Median server-side execution time of one INSERT (EXPLAIN ANALYZE, own transaction)."""
    sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + INSERT_SQL
    times = []
    for pool, prefix in probes:
        plan = json.loads(await build.conn.fetchval(sql, pool, prefix, "node/probe"))[0]
        times.append(plan["Execution Time"] * 1e3)
    await build.conn.execute(f"DELETE FROM {TABLE} WHERE id > $1", build.max_id)  # noqa: S608
    await build.conn.execute(f"VACUUM {TABLE}")
    return med(times)


async def measure_size(build: Build, size: int, inserts: int, reps: int) -> dict[str, Any]:
    """Single-row insert cost at `size` held rows, `reps` times; sizes on disk."""
    await settle(build.conn)
    probes = build.rows[size : size + inserts]
    samples = []
    for _ in range(reps):
        us = await time_inserts(build, probes)
        samples.append({"mean": statistics.fmean(us), "p50": med(us), "p99": pct(us, 0.99)})
        await build.conn.execute("CHECKPOINT")
    result = {
        "size": size,
        "us_per_insert": med([s["mean"] for s in samples]),
        "probe": await probe_cost(build, probes[:20]),
        "server_us_per_insert": await server_insert_cost(build, probes[:200]),
        "reps": samples,
        "bytes": await sizes(build.conn),
        "load": build.loads[-1],
    }
    reps_text = ", ".join(f"{s['mean']:.0f}" for s in samples)
    print(
        f"    {size:>9,} held: {result['us_per_insert']:7.1f} us/insert (reps {reps_text})",
        flush=True,
    )
    return result


async def lookup_cost(
    conn: asyncpg.Connection[Any], table: str, addresses: Sequence[str], runs: int
) -> dict[str, Any]:
    """Cross-pool address lookup: prepared-statement latency, EXPLAIN times, locks taken."""
    sql = LOOKUP_SQL.format(table=table)
    stmt = await conn.prepare(sql)
    walls = []
    for i in range(runs):
        t0 = time.perf_counter_ns()
        found = await stmt.fetch(addresses[i % len(addresses)])
        walls.append((time.perf_counter_ns() - t0) / 1e3)
        if not found:
            raise AssertionError(("lookup found nothing", addresses[i % len(addresses)]))
    plans, execs, nodes = [], [], set()
    for i in range(min(runs, 20)):
        text = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.replace("$1::inet", "$1::text::inet"),
            addresses[i % len(addresses)],
        )
        plan = json.loads(text)[0]
        plans.append(plan["Planning Time"] * 1e3)
        execs.append(plan["Execution Time"] * 1e3)
        nodes |= plan_nodes(plan["Plan"])
    async with conn.transaction():
        await stmt.fetch(addresses[0])
        locks = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'relation'"
        )
    return {
        "prepared_us_p50": med(walls),
        "prepared_us_p99": pct(walls, 0.99),
        "explain_planning_us": med(plans),
        "explain_execution_us": med(execs),
        "relation_locks": locks,
        "plan_nodes": sorted(nodes),
    }


def plan_nodes(plan: dict[str, Any]) -> set[str]:
    """Node types (with index names, partition numbers folded) of an EXPLAIN JSON plan."""
    name = plan["Node Type"]
    if "Index Name" in plan:
        name += " " + "".join("N" if ch.isdigit() else ch for ch in plan["Index Name"])
    out = {name}
    for child in plan.get("Plans", []):
        out |= plan_nodes(child)
    return out


async def run_build(
    args: argparse.Namespace, design: Design, pools: int, order: str
) -> dict[str, Any]:
    """Grow one table through every size, measuring inserts at each."""
    sizes_ = args.sizes
    caps = [
        args.cap[k]
        for k in (design.key, f"{design.key}:{order}", f"{design.key}:{pools}:{order}")
        if k in args.cap
    ]
    if caps:
        sizes_ = [n for n in sizes_ if n <= min(caps)]
    conn = await connect(args.dsn, args.sync_commit)
    try:
        await create(conn, design, pools)
        rows = workload(pools, order, max(sizes_) + args.inserts, seed=pools)
        build = Build(conn, design, rows)
        results = []
        for size in sizes_:
            await load_to(build, size, args.max_stage_seconds)
            results.append(await measure_size(build, size, args.inserts, args.reps))
        held = rows[: max(sizes_)]
        addresses = [address_in(p) for _, p in random.Random(1).sample(held, 200)]
        runs = 20 if design.key == "base" else 200
        lookup = await lookup_cost(conn, TABLE, addresses, runs)
        print(f"    lookup: {lookup['prepared_us_p50']:.0f} us {lookup['plan_nodes']}", flush=True)
        return {
            "design": design.key,
            "pools": pools,
            "order": order,
            "sizes": results,
            "lookup_at_max": lookup,
            "constraints": await constraint_defs(conn),
        }
    finally:
        await reset(conn)
        await conn.close()


# ---------------------------------------------------------------- partitions and lookups


async def partition_lookup(args: argparse.Namespace, parts: int) -> dict[str, Any]:
    """Design B with `parts` pools: cross-pool lookup, insert routing, adding one more pool."""
    conn = await connect(args.dsn, args.sync_commit)
    table = f"lk_{parts}"
    try:
        await reset(conn)
        t0 = time.perf_counter()
        await conn.execute(
            f"CREATE TABLE {table} ({COLUMNS}, PRIMARY KEY (id, pool_id)) "
            "PARTITION BY LIST (pool_id)"
        )
        for k in range(1, parts + 1):  # one pool per transaction, as CreatePool would
            async with conn.transaction():
                for stmt in partition_ddl(table, k):
                    await conn.execute(stmt)
        ddl_s = time.perf_counter() - t0
        rows = workload(parts, "inorder", args.lookup_rows, seed=0)
        await conn.copy_records_to_table(
            table,
            records=[(p, prefix, "node/x") for p, prefix in rows],
            columns=["pool_id", "prefix", "owner"],
        )
        await conn.execute(f"VACUUM ANALYZE {table}")
        addresses = [address_in(p) for _, p in random.Random(2).sample(rows, 200)]
        result = await lookup_cost(conn, table, addresses, 200)
        await conn.execute("SET plan_cache_mode = force_custom_plan")
        custom = await lookup_cost(conn, table, addresses, 100)
        await conn.execute("RESET plan_cache_mode")
        result["prepared_us_p50_custom_plan"] = custom["prepared_us_p50"]
        result["relation_locks_custom_plan"] = custom["relation_locks"]
        stmt = await conn.prepare(
            f"INSERT INTO {table} (pool_id, prefix, owner) VALUES ($1, $2, $3) RETURNING id"  # noqa: S608
        )
        probes = workload(parts, "inorder", args.lookup_rows + 1000, seed=0)[args.lookup_rows :]
        walls = []
        for pool, prefix in probes:
            t1 = time.perf_counter_ns()
            await stmt.fetchval(pool, prefix, "node/probe")
            walls.append((time.perf_counter_ns() - t1) / 1e3)
        t1 = time.perf_counter()
        async with conn.transaction():
            for stmt_text in partition_ddl(table, parts + 1):
                await conn.execute(stmt_text)
        add_pool_ms = (time.perf_counter() - t1) * 1e3
        result |= {
            "partitions": parts,
            "rows": args.lookup_rows,
            "create_partitions_s": ddl_s,
            "insert_us_mean": statistics.fmean(walls),
            "add_partition_ms": add_pool_ms,
        }
        print(
            f"  {parts:>5} partitions: lookup {result['prepared_us_p50']:.0f} us prepared, "
            f"plan {result['explain_planning_us']:.0f} + exec {result['explain_execution_us']:.0f}"
            f" us, {result['relation_locks']} locks; insert {result['insert_us_mean']:.0f} us",
            flush=True,
        )
        return result
    finally:
        await reset(conn)
        await conn.close()


# ---------------------------------------------------------------- correctness

# (pool, prefix, expected to succeed); "release"/"reactivate" act on (pool, prefix).
CASES: tuple[tuple[str, int, str, bool], ...] = (
    ("insert", 1, "fd00:1::/64", True),
    ("insert", 1, "fd00:1:0:1::/64", True),  # adjacent
    ("insert", 1, "fd00:1::/48", False),  # covers both
    ("insert", 1, "fd00:1::/64", False),  # duplicate
    ("insert", 1, "fd00:1::1/128", False),  # inside
    ("insert", 2, "fd00:1::/48", True),  # another pool
    ("insert", 3, "0.0.0.0/0", True),
    ("insert", 3, "::/0", True),  # IPv4 and IPv6 do not collide
    ("insert", 3, "255.255.255.255/32", False),
    ("insert", 3, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", False),
    ("insert", 4, "::/1", True),
    ("insert", 4, "8000::/1", True),
    ("insert", 4, "8000::/128", False),
    ("insert", 4, "7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", False),
    ("insert", 5, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", True),
    ("insert", 6, "0.0.0.0/32", True),  # next slot after pool 5's last IPv6 address
    ("insert", 6, "::/128", True),
    ("quarantine", 1, "fd00:1::/64", True),
    ("insert", 1, "fd00:1::/64", False),  # quarantined still holds it
    ("release", 1, "fd00:1::/64", True),
    ("insert", 1, "fd00:1::/64", True),  # released: reusable
    ("reactivate", 1, "fd00:1::/64", False),  # the released row cannot come back
)


async def run_case(
    conn: asyncpg.Connection[Any], case: tuple[str, int, str, bool]
) -> dict[str, Any]:
    """Run one correctness case in its own transaction; return what happened."""
    action, pool, prefix, _ = case
    sql = {
        "insert": "INSERT INTO allocations (pool_id, prefix, owner) VALUES ($1, $2, 'case')",
        "quarantine": (
            "UPDATE allocations SET state = 'quarantined' "
            "WHERE pool_id = $1 AND prefix = $2 AND state = 'active'"
        ),
        "release": (
            "UPDATE allocations SET state = 'released' "
            "WHERE pool_id = $1 AND prefix = $2 AND state = 'quarantined'"
        ),
        "reactivate": (
            "UPDATE allocations SET state = 'active' "
            "WHERE pool_id = $1 AND prefix = $2 AND state = 'released'"
        ),
    }[action]
    try:
        await conn.execute(sql, pool, prefix)
    except asyncpg.PostgresError as exc:
        return {
            "ok": False,
            "error": type(exc).__name__,
            "sqlstate": exc.sqlstate,
            "constraint": getattr(exc, "constraint_name", None),
            "message": str(exc),
            "detail": getattr(exc, "detail", None),
        }
    return {"ok": True}


async def correctness(args: argparse.Namespace, design: Design) -> dict[str, Any]:
    """The overlap cases on a fresh small table; the first violation's error fields."""
    conn = await connect(args.dsn, args.sync_commit)
    try:
        await create(conn, design, 6)
        outcomes = [await run_case(conn, case) for case in CASES]
        mismatches = [
            f"{case[0]} {case[1]} {case[2]}: expected {case[3]}"
            for case, got in zip(CASES, outcomes, strict=True)
            if got["ok"] != case[3]
        ]
        errors = [o for o in outcomes if not o["ok"]]
        return {"mismatches": mismatches, "first_violation": errors[0] if errors else None}
    finally:
        await reset(conn)
        await conn.close()


EDGE_ADDRESSES = (
    "::",
    "::1",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "8000::",
    "7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "0:0:0:0:8000::",
    "ffff:ffff:7fff:ffff:ffff:ffff:7fff:ffff",
    "::ffff:1.2.3.4",
    "0.0.0.0",  # noqa: S104 (an address to encode, not a bind address)
    "255.255.255.255",
    "128.0.0.0",
    "127.255.255.255",
)


def expected_span(pool: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """What kipam_span_numeric must return, computed with ipaddress."""
    base = (2 * pool + (net.version == 6)) << 128
    return base + int(net.network_address), base + int(net.broadcast_address)


def expected_bytes(
    pool: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network
) -> tuple[bytes, bytes]:
    """What kipam_span_bytes must return, computed with ipaddress."""
    head = pool.to_bytes(4, "big") + bytes([2 if net.version == 4 else 3])
    return head + net.network_address.packed, head + net.broadcast_address.packed


async def check_encodings(args: argparse.Namespace) -> dict[str, Any]:
    """kipam_inet_numeric / kipam_span_* against Python's ipaddress on edge and random cases."""
    rng = random.Random(7)
    addrs = list(EDGE_ADDRESSES)
    addrs += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(2000)]
    addrs += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(500)]
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for a in addrs:
        ip = ipaddress.ip_address(a)
        lengths = (0, ip.max_prefixlen, rng.randrange(ip.max_prefixlen + 1))
        nets.extend(ipaddress.ip_network((int(ip), n), strict=False) for n in lengths)
    conn = await connect(args.dsn, args.sync_commit)
    try:
        got = await conn.fetch(
            "SELECT a, kipam_inet_numeric(a::inet) AS n FROM unnest($1::text[]) a", addrs
        )
        bad = [r["a"] for r in got if int(r["n"]) != int(ipaddress.ip_address(r["a"]))]
        spans = await conn.fetch(
            """SELECT p, pool, lower(kipam_span_numeric(pool, p::cidr)) AS lo,
                      upper(kipam_span_numeric(pool, p::cidr)) AS hi,
                      lower(kipam_span_bytes(pool, p::cidr)) AS blo,
                      upper(kipam_span_bytes(pool, p::cidr)) AS bhi
               FROM unnest($1::text[], $2::int[]) AS t(p, pool)""",
            [str(n) for n in nets],
            [1 + i % 70_000 for i in range(len(nets))],
        )
        for r in spans:
            net = ipaddress.ip_network(r["p"])
            if (int(r["lo"]), int(r["hi"])) != expected_span(r["pool"], net):
                bad.append(f"numeric {r['pool']} {r['p']}")
            if (bytes(r["blo"]), bytes(r["bhi"])) != expected_bytes(r["pool"], net):
                bad.append(f"bytes {r['pool']} {r['p']}")
        cost = {}
        for name, expr in (
            ("kipam_inet_numeric", "kipam_inet_numeric(a)"),
            ("kipam_span_numeric", "kipam_span_numeric(7, a)"),
            ("kipam_span_bytes", "kipam_span_bytes(7, a)"),
            ("inet_send only", "inet_send(a)"),
        ):
            cost[name] = await expression_cost(conn, expr)
        return {"checked": len(addrs) + 2 * len(nets), "mismatches": bad, "us_per_call": cost}
    finally:
        await conn.close()


async def expression_cost(conn: asyncpg.Connection[Any], expr: str) -> float:
    """Microseconds per evaluation of `expr` over 200k IPv6 /64s (median of 3, minus a count)."""
    src = (
        "SELECT set_masklen('fd00:1::'::inet + (i::bigint << 12), 64) AS a "
        "FROM generate_series(1, 200000) i"
    )
    await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS enc_src AS {src}")
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        await conn.fetchval(f"SELECT count({expr}) FROM enc_src")  # noqa: S608
        t1 = time.perf_counter()
        await conn.fetchval("SELECT count(a) FROM enc_src")
        samples.append((t1 - t0) - (time.perf_counter() - t1))
    return med(samples) / 200_000 * 1e6


# ---------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    sizes_ = report["args"]["sizes"]
    head = " / ".join(f"{s:,}" for s in sizes_)
    lines = [
        (
            f"PostgreSQL {report['server']}; synchronous_commit={report['args']['sync_commit']}; "
            f"{report['args']['inserts']} single-row INSERTs per size, median of "
            f"{report['args']['reps']} reps; {report['date']}; {report['seconds'] / 60:.1f} min"
        ),
        "",
        (
            f"| design | pools | order | µs/insert at {head} | max/min | "
            f"excess over base at {head} | server µs at {head} | pages per overlap probe | "
            "COPY µs/row per stage | "
            "MB at largest (heap + excl + other idx) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = {(r["pools"], r["order"]): r for r in report["builds"] if r["design"] == "base"}
    lines += [build_row(r, sizes_, base.get((r["pools"], r["order"]))) for r in report["builds"]]
    lines += [
        "",
        "`*` = COPY too slow with the constraint: dropped, copied, ADD CONSTRAINT (time included).",
        "",
        (
            "| lookup `prefix >>= $1` at largest size | pools | order | prepared p50 µs | "
            "EXPLAIN plan µs | exec µs | relation locks | plan |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["builds"]:
        lk = r["lookup_at_max"]
        lines.append(
            f"| {r['design']} | {r['pools']} | {r['order']} | {lk['prepared_us_p50']:.0f} | "
            f"{lk['explain_planning_us']:.0f} | {lk['explain_execution_us']:.0f} | "
            f"{lk['relation_locks']} | {', '.join(lk['plan_nodes'])} |"
        )
    lines += render_partitions(report)
    lines += [
        "",
        "| design | overlap cases | violation SQLSTATE | DETAIL |",
        "| --- | --- | --- | --- |",
    ]
    for key, c in report["correctness"].items():
        v = c["first_violation"] or {}
        lines.append(
            f"| {key} | {cases_text(c['mismatches'])} | "
            f"{v.get('sqlstate', '-')} {v.get('error', '')} | {v.get('detail', '-')} |"
        )
    enc = report["encodings"]
    lines += [
        "",
        f"Encodings checked against ipaddress: {enc['checked']} values, "
        f"{len(enc['mismatches'])} mismatches; µs per call: "
        + ", ".join(f"{k} {v:.2f}" for k, v in enc["us_per_call"].items()),
    ]
    return "\n".join(lines)


def build_row(r: dict[str, Any], sizes_: list[int], base: dict[str, Any] | None) -> str:
    """One row of the scaling table; '-' where a size was not run."""
    by_size = {m["size"]: m for m in r["sizes"]}
    base_us = {m["size"]: m["us_per_insert"] for m in base["sizes"]} if base else {}

    def each(fn: Callable[[int, dict[str, Any]], str]) -> str:
        return " / ".join(fn(n, by_size[n]) if n in by_size else "-" for n in sizes_)

    us = [m["us_per_insert"] for m in r["sizes"]]
    excess = (
        each(lambda n, m: f"{m['us_per_insert'] - base_us[n]:.0f}" if n in base_us else "-")
        if r["design"] != "base"
        else "-"
    )
    probes = each(lambda _n, m: f"{m['probe']['buffers']:.0f}" if m["probe"] else "-")
    server = each(lambda _n, m: f"{m['server_us_per_insert']:.0f}")
    loads = each(
        lambda _n, m: (
            f"{m['load']['us_per_row']:.0f}"
            + ("*" if m["load"]["method"].startswith("constraint") else "")
        )
    )
    mb = r["sizes"][-1]["bytes"]
    return (
        f"| {r['design']} {DESIGNS[r['design']].title} | {r['pools']} | {r['order']} | "
        f"{each(lambda _n, m: format(m['us_per_insert'], '.0f'))} | {max(us) / min(us):.2f} | "
        f"{excess} | {server} | {probes} | {loads} | "
        f"{mb['total'] / 2**20:.0f} at {r['sizes'][-1]['size']:,} "
        f"({mb['heap'] / 2**20:.0f} + {mb['exclusion_index'] / 2**20:.0f} + "
        f"{mb['other_indexes'] / 2**20:.0f}) |"
    )


def cases_text(mismatches: list[str]) -> str:
    """Summary of the overlap cases for one design."""
    if not mismatches:
        return f"all {len(CASES)} as expected"
    return f"{len(mismatches)} of {len(CASES)} not as expected (overlaps accepted)"


def render_partitions(report: dict[str, Any]) -> list[str]:
    """Table for the partition-count experiment."""
    if not report["partitions"]:
        return []
    lines = [
        "",
        (
            f"| B partitions ({report['args']['lookup_rows']:,} rows in all) | lookup prepared "
            "p50 µs (generic plan) | custom plan µs | EXPLAIN plan µs | exec µs | "
            "relation locks | insert µs | CREATE all partitions s | add one partition ms |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {p['partitions']} | {p['prepared_us_p50']:.0f} | {p['prepared_us_p50_custom_plan']:.0f}"
        f" | {p['explain_planning_us']:.0f} | {p['explain_execution_us']:.0f} | "
        f"{p['relation_locks']} | {p['insert_us_mean']:.0f} | {p['create_partitions_s']:.1f} | "
        f"{p['add_partition_ms']:.0f} |"
        for p in report["partitions"]
    ]
    return lines


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--designs", default="base,A,B,C,Cg", help=f"of {','.join(DESIGNS)}")
    parser.add_argument("--pools", default="1,16")
    parser.add_argument("--orders", default="inorder,random")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--inserts", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--partitions", default="16,300,1000", help="'' to skip")
    parser.add_argument("--lookup-rows", type=int, default=1_000_000)
    parser.add_argument("--max-stage-seconds", type=float, default=900.0)
    parser.add_argument("--sync-commit", default="off", choices=["on", "off", "local"])
    parser.add_argument(
        "--cap",
        default="A=100000,C:inorder=100000,D:inorder=100000",
        help=(
            "largest size per DESIGN[:ORDER] or DESIGN:POOLS:ORDER, comma-separated; '' = none. "
            "A to 10**6 takes about 10 min per build (its cost per row grows linearly), "
            "SP-GiST range designs in address order hours (their quad tree degenerates)"
        ),
    )
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.designs = args.designs.split(",")
    args.pools = [int(p) for p in args.pools.split(",")]
    args.orders = args.orders.split(",")
    args.partitions = [int(p) for p in args.partitions.split(",") if p]
    args.cap = {k: int(v) for k, v in (c.split("=") for c in args.cap.split(",") if c)}
    return args


def save(report: dict[str, Any], path: Path | None) -> None:
    """Write the report so far (a crash late in a long run keeps the rest)."""
    if path:
        path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    """Run everything; return the report."""
    conn = await connect(args.dsn, args.sync_commit)
    await conn.execute(FUNCTIONS_SQL)
    server = await conn.fetchval("SHOW server_version")
    await conn.close()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "server": server,
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "encodings": await check_encodings(args),
        "correctness": {},
        "builds": [],
        "partitions": [],
    }
    for key in args.designs:
        report["correctness"][key] = await correctness(args, DESIGNS[key])
    print(json.dumps(report["encodings"]["us_per_call"]), flush=True)
    for pools in args.pools:
        for order in args.orders:
            for key in args.designs:
                print(f"{key} {DESIGNS[key].title}, {pools} pools, {order}", flush=True)
                report["builds"].append(await run_build(args, DESIGNS[key], pools, order))
                save(report, args.json)
    for parts in args.partitions:
        report["partitions"].append(await partition_lookup(args, parts))
        save(report, args.json)
    report["seconds"] = time.perf_counter() - started
    return report


def main() -> None:
    """Entry point."""
    args = parse_args()
    report = asyncio.run(amain(args))
    save(report, args.json)
    print(render(report))


if __name__ == "__main__":
    main()
