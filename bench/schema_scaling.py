"""Insert cost on kipam's real schema at 10**4, 10**5 and 10**6 held allocations.

Confirms, on the schema of ``migrations/`` (partition per pool, SP-GiST overlap constraint,
reserved-range trigger, every index), what ``pg_constraint_scaling.py`` measured on a bare
table: the cost of one allocation INSERT stays flat as the table grows. For one pool and for
16 pools: COPY held /64s up to each size (address order, as the allocator hands them out),
then time ``--inserts`` single-row INSERTs, each its own transaction, and report the median
microseconds per insert (median of ``--reps``) and the ratio of the largest to the smallest.

Usage: ``python bench/schema_scaling.py [--dsn DSN] [--inserts 1000] [--reps 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

import asyncpg

from service.migrate import migrate

SIZES = (10_000, 100_000, 1_000_000)
INSERT = (
    "INSERT INTO allocations (pool_id, pool_cidr, prefix, owner, revision)"
    " VALUES ($1, $2::cidr, $3::cidr, 'bench/insert', 0) RETURNING id"
)


def slot(pool: int, n: int) -> str:
    """The n-th /64 of pool `pool` (fd20:pool::/32)."""
    return f"fd20:{pool:x}:{n >> 16:x}:{n & 0xFFFF:x}::/64"


async def fill(conn: asyncpg.Connection, pools: int, start: int, stop: int) -> None:
    """COPY held allocations start..stop-1 (round-robin over the pools)."""
    rows = [
        (p, f"fd20:{p:x}::/32", slot(p, n // pools), "bench/held", 0)
        for n in range(start, stop)
        for p in [n % pools + 1]
    ]
    await conn.copy_records_to_table(
        "allocations",
        records=rows,
        columns=["pool_id", "pool_cidr", "prefix", "owner", "revision"],
    )


async def time_inserts(conn: asyncpg.Connection, pools: int, base: int, count: int) -> float:
    """Median µs of `count` single-row INSERTs above everything held; then removes them."""
    stmt = await conn.prepare(INSERT)
    samples: list[float] = []
    ids: list[tuple[int, int]] = []
    for i in range(count):
        p = i % pools + 1
        started = time.perf_counter()
        ids.append((p, await stmt.fetchval(p, f"fd20:{p:x}::/32", slot(p, base + i))))
        samples.append(time.perf_counter() - started)
    # The rows are history to the schema (no DELETE): mark them released and move them away
    # from the held set the next size measures.
    await conn.execute(
        "UPDATE allocations SET state = 'released', released_at = now(), reusable_at = now()"
        " WHERE owner = 'bench/insert' AND state = 'active'"
    )
    return statistics.median(samples) * 1e6


async def run(server_dsn: str, pools: int, inserts: int, reps: int) -> dict[str, float]:
    """One database: fill to each size, time inserts; µs per size."""
    name = f"kipam_scaling_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"{server_dsn.rpartition('/')[0]}/{name}"
    conn = await asyncpg.connect(dsn)
    out: dict[str, float] = {}
    try:
        await migrate(conn)
        for p in range(1, pools + 1):
            await conn.execute(
                "INSERT INTO pools (space_id, name, cidr, role, policy, revision)"
                " VALUES (1, $1, $2, 'container', '{}', 0)",
                f"p{p}",
                f"fd20:{p:x}::/32",
            )
        held = 0
        extra = 0
        for size in SIZES:
            load = time.perf_counter()
            await fill(conn, pools, held, size)
            load_s = time.perf_counter() - load
            held = size
            await conn.execute("VACUUM ANALYZE allocations")
            results = []
            for _ in range(reps):
                results.append(await time_inserts(conn, pools, size // pools + 1 + extra, inserts))
                extra += inserts
            out[str(size)] = statistics.median(results)
            out[f"load_s_{size}"] = load_s
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return out


def main() -> None:
    """Both shapes; print a Markdown table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--inserts", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {
        str(pools): asyncio.run(run(args.dsn, pools, args.inserts, args.reps)) for pools in (1, 16)
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print("| pools | µs/insert at 10^4 / 10^5 / 10^6 held | max/min | COPY s to each size |")
    print("| --- | --- | --- | --- |")
    for pools, r in report.items():
        costs = [r[str(s)] for s in SIZES]
        loads = " / ".join(f"{r[f'load_s_{s}']:.1f}" for s in SIZES)
        print(
            f"| {pools} | {' / '.join(f'{c:.0f}' for c in costs)} | "
            f"{max(costs) / min(costs):.2f} | {loads} |"
        )


if __name__ == "__main__":
    main()
