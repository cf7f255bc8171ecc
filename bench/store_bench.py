"""Store benchmark: allocations through the use-case layer beside a pgbench ceiling, one run.

Cases (each against a fresh, migrated database on the same server):

* **ceiling**: pgbench running the one-allocation transaction shape (lock the pool row,
  insert under the overlap constraint, bump the generation) at the same concurrency:
  16 clients over 16 pools, and 32 clients on one pool;
* **spread**: 16 concurrent callers through :class:`service.usecases.Kipam`, caller i on
  pool i (16 pools);
* **hot**: 32 concurrent callers on one pool (group commit serves them together);
* **batch**: ``allocate_many`` of 1,000 prefixes per call, one caller.

Every case reports allocations/s and, for ours, p50/p99 latency per call. The use-case
layer runs in this process (as the service would), with advisory locks, or Redis locks with
``--redis``.

Usage: ``python bench/store_bench.py [--dsn DSN] [--seconds 10] [--runs 3] [--redis URL]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import uvloop

from service.config import Settings
from service.locks import LockManager
from service.migrate import migrate
from service.models import AllocationRequest, PoolPolicy
from service.store import Database
from service.usecases import Kipam

PGBENCH_SCRIPT = """
\\set pool (:client_id % :pools) + 1
BEGIN;
SELECT generation FROM pools WHERE id = :pool FOR UPDATE;
INSERT INTO allocations (pool_id, pool_cidr, prefix, owner, revision)
  SELECT p.id, p.cidr,
         format('fd10:%s:%s:%s::/64', to_hex(p.id), to_hex(s.n >> 16), to_hex(s.n & 65535))::cidr,
         'bench/pgbench', s.n
    FROM pools p, (SELECT nextval('kipam_revision') AS n) s WHERE p.id = :pool;
UPDATE pools SET generation = generation + 1 WHERE id = :pool;
END;
"""


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of the values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fresh_database(server_dsn: str) -> str:
    """Create and migrate a database of this run's own; return its DSN."""
    name = f"kipam_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base, sep, query = server_dsn.partition("?")
    dsn = f"{base.rpartition('/')[0]}/{name}{sep}{query}"
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    return dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop a run's database."""
    name = dsn.partition("?")[0].rpartition("/")[2]
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def pgbench(dsn: str, clients: int, pools: int, seconds: int) -> dict[str, float]:
    """Run pgbench with the allocation transaction; return tps and mean latency (ms)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(PGBENCH_SCRIPT)
        script = f.name
    try:
        out = subprocess.run(
            [
                "pgbench",
                "-n",
                "-M",
                "prepared",
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(seconds),
                "-D",
                f"pools={pools}",
                "-f",
                script,
                dsn,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 120,
        ).stdout
    finally:
        Path(script).unlink()
    tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    latency = float(re.search(r"latency average = ([0-9.]+) ms", out).group(1))  # type: ignore[union-attr]
    return {"per_s": tps, "mean_ms": latency}


async def make_pools(conn: asyncpg.Connection, count: int, prefix: str) -> None:
    """Root pools `{prefix}{i}` over fd10:i::/32 (pgbench) without quarantine."""
    for i in range(1, count + 1):
        await conn.execute(
            "INSERT INTO pools (space_id, name, cidr, role, policy, revision)"
            " VALUES (1, $1, $2, 'container', $3::text::jsonb, nextval('kipam_revision'))",
            f"{prefix}{i}",
            f"fd10:{i:x}::/32",
            json.dumps(PoolPolicy(quarantine_seconds=0).to_json()),
        )


async def callers(kipam: Kipam, pools: list[str], tasks: int, seconds: float) -> dict[str, float]:
    """`tasks` callers allocating /64s for `seconds`, caller i on pools[i % len(pools)]."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        pool = pools[i % len(pools)]
        n = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await kipam.allocate(pool, owner=f"bench/c{i}-{n}", length=64)
            latencies.append(time.perf_counter() - start)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(tasks)))
    elapsed = time.perf_counter() - started
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


async def batches(kipam: Kipam, pool: str, size: int, calls: int) -> dict[str, float]:
    """`calls` batch allocations of `size` /64s each, one after another."""
    latencies: list[float] = []
    started = time.perf_counter()
    for c in range(calls):
        requests = [AllocationRequest(owner=f"bench/b{c}-{i}", length=64) for i in range(size)]
        start = time.perf_counter()
        await kipam.allocate_many(pool, requests)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - started
    return {
        "per_s": size * calls / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


async def one_run(
    server_dsn: str, seconds: int, redis_url: str | None, lanes: int
) -> dict[str, dict[str, float]]:
    """Every case once, each on a fresh database."""
    out: dict[str, dict[str, float]] = {}
    for case, clients, pools in (("ceiling_spread", 16, 16), ("ceiling_hot", 32, 1)):
        dsn = await fresh_database(server_dsn)
        conn = await asyncpg.connect(dsn)
        await make_pools(conn, pools, "pg")
        await conn.close()
        out[case] = await asyncio.to_thread(pgbench, dsn, clients, pools, seconds)
        await drop_database(server_dsn, dsn)
    for case in ("spread", "hot", "batch"):
        dsn = await fresh_database(server_dsn)
        settings = Settings(db_pool_min=4, db_pool_max=20)
        db = await Database.open(dsn, settings)
        locks = LockManager(redis_url)
        await locks.start()
        kipam = Kipam(db, locks, lanes=lanes)
        async with db.connection() as conn:
            await make_pools(conn, 16, "p")
        if case == "spread":
            out[case] = await callers(kipam, [f"p{i}" for i in range(1, 17)], 16, seconds)
        elif case == "hot":
            out[case] = await callers(kipam, ["p1"], 32, seconds)
        else:
            out[case] = await batches(kipam, "p1", 1000, 20)
        await kipam.close()
        await locks.close()
        await db.close()
        await drop_database(server_dsn, dsn)
    return out


def main() -> None:
    """Run every case `--runs` times; print medians as Markdown and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", default=None)
    parser.add_argument("--lanes", type=int, default=Settings.write_lanes)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [
        uvloop.run(one_run(args.dsn, args.seconds, args.redis, args.lanes))
        for _ in range(args.runs)
    ]
    cases = list(runs[0])
    summary = {
        case: {k: statistics.median(r[case][k] for r in runs) for k in runs[0][case]}
        for case in cases
    }
    report = {
        "runs": runs,
        "median": summary,
        "seconds": args.seconds,
        "locks": "redis" if args.redis else "advisory",
        "lanes": args.lanes,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    m = summary
    spread_ratio = m["spread"]["per_s"] / m["ceiling_spread"]["per_s"]
    hot_ratio = m["hot"]["per_s"] / m["ceiling_hot"]["per_s"]
    print(
        f"{report['date']}, locks {report['locks']}, {args.lanes} lanes, "
        f"{args.runs} runs x {args.seconds} s, medians"
    )
    print()
    print("| case | ours /s | p50 ms | p99 ms | pgbench /s (mean ms) | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| 16 pools, 16 callers | {m['spread']['per_s']:,.0f} | {m['spread']['p50_ms']:.1f} | "
        f"{m['spread']['p99_ms']:.1f} | {m['ceiling_spread']['per_s']:,.0f} "
        f"({m['ceiling_spread']['mean_ms']:.1f}) | {spread_ratio:.2f} | >= 0.60 |"
    )
    print(
        f"| 1 pool, 32 callers | {m['hot']['per_s']:,.0f} | {m['hot']['p50_ms']:.1f} | "
        f"{m['hot']['p99_ms']:.1f} | {m['ceiling_hot']['per_s']:,.0f} "
        f"({m['ceiling_hot']['mean_ms']:.1f}) | {hot_ratio:.2f} | >= 1.5 |"
    )
    print(
        f"| batch of 1,000 | {m['batch']['per_s']:,.0f} prefixes/s | {m['batch']['p50_ms']:.0f} | "
        f"{m['batch']['p99_ms']:.0f} | | | >= 10,000/s |"
    )


if __name__ == "__main__":
    main()
