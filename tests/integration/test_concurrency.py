"""Several OS processes allocating at once, with faults: no overlap, nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service.models import PoolPolicy

if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Callable

    from service.store import Database
    from service.usecases import Kipam

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER = Path(__file__).with_name("alloc_worker.py")
PROCESSES = 4
TASKS = 16
COUNT = 8


async def make_pools(kipam: Kipam, names: list[str]) -> None:
    """Root pools of 2**16 /64s each, no quarantine."""
    for i, name in enumerate(names):
        await kipam.create_pool(
            name, cidr=f"fd12:3456:{i:x}::/48", policy=PoolPolicy(quarantine_seconds=0)
        )


async def run_workers(
    dsn: str, redis: str, pools: list[str], *, processes: int = PROCESSES, retry: bool = True
) -> list[dict[str, object]]:
    """Start the worker processes, wait for all (bounded), return every JSON line they printed."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            dsn,
            redis,
            f"p{n}",
            ",".join(pools),
            str(TASKS),
            str(COUNT),
            *(["retry"] if retry else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(processes)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 240)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    return [json.loads(line) for out, _ in outputs for line in out.decode().splitlines()]


async def check_database(db: Database, acknowledged: dict[str, str]) -> None:
    """Every acknowledged allocation is stored as acknowledged, and nothing held overlaps."""
    rows = await db.fetch(
        "SELECT a.idempotency_key, a.prefix, a.pool_id, a.state FROM allocations a"
        " WHERE a.idempotency_key IS NOT NULL"
    )
    stored = {r["idempotency_key"]: str(r["prefix"]) for r in rows}
    for key, prefix in acknowledged.items():
        assert stored.get(key) == prefix, f"acknowledged {key} -> {prefix} is lost"
    by_pool: dict[int, list[ipaddress.IPv6Network]] = {}
    for r in rows:
        if r["state"] != "released":
            by_pool.setdefault(r["pool_id"], []).append(r["prefix"])
    for prefixes in by_pool.values():
        ordered = sorted(prefixes)
        for a, b in itertools.pairwise(ordered):
            assert not a.overlaps(b), f"{a} overlaps {b}"
    # Nothing half-written: every allocation has its history row, every pool's generation
    # counts at least one transaction per change it recorded.
    orphans = await db.fetch(
        "SELECT a.id FROM allocations a LEFT JOIN changes c"
        " ON c.allocation_id = a.id AND c.kind = 'allocation.created' WHERE c.revision IS NULL"
    )
    assert orphans == []


@pytest.mark.parametrize("backend", ["redis", "advisory"])
@pytest.mark.parametrize("shape", ["one-pool", "several-pools"])
async def test_processes_never_overlap_and_lose_nothing(
    kipam_advisory: Kipam, db: Database, dsn: str, redis_url: str, backend: str, shape: str
) -> None:
    """4 processes x 16 tasks allocate at once: distinct prefixes, all stored, retries stable."""
    pools = ["hot"] if shape == "one-pool" else ["p0", "p1", "p2", "p3"]
    await make_pools(kipam_advisory, pools)
    lines = await run_workers(dsn, redis_url if backend == "redis" else "-", pools)
    errors = [line for line in lines if "error" in line]
    assert errors == []
    acknowledged = {str(rec["key"]): str(rec["prefix"]) for rec in lines if "key" in rec}
    assert len(acknowledged) == PROCESSES * TASKS * COUNT
    assert len(
        set(
            zip(
                acknowledged.values(),
                (rec.get("pool") for rec in lines if "key" in rec),
                strict=False,
            )
        )
    ) == len(acknowledged)
    retries = [line for line in lines if "retry" in line]
    assert len(retries) == len(acknowledged)
    for retry in retries:
        assert retry["prefix"] == retry["was"]
        assert retry["created"] is False
    await check_database(db, acknowledged)


# -- faults ---------------------------------------------------------------------------------


async def read_lines_until(
    proc: asyncio.subprocess.Process, count: int, within_s: float
) -> list[dict[str, object]]:
    """Read JSON lines from a worker until `count` acknowledged ones (bounded by `within_s`)."""
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []
    deadline = time.monotonic() + within_s
    while sum(1 for line in lines if "prefix" in line) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the worker acknowledged too little in time"
        raw = await asyncio.wait_for(proc.stdout.readline(), remaining)
        if not raw:
            break
        lines.append(json.loads(raw))
    return lines


async def spawn(
    dsn: str, redis: str, name: str, pools: list[str], count: int
) -> asyncio.subprocess.Process:
    """One worker process with 4 tasks, output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        dsn,
        redis,
        name,
        ",".join(pools),
        "4",
        str(count),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("backend", ["redis", "advisory"])
async def test_process_killed_while_allocating(
    kipam_advisory: Kipam, db: Database, dsn: str, redis_url: str, backend: str
) -> None:
    """A process SIGKILLed mid-run loses nothing it acknowledged, and the others go on."""
    await make_pools(kipam_advisory, ["hot"])
    redis = redis_url if backend == "redis" else "-"
    victim = await spawn(dsn, redis, "victim", ["hot"], 500)
    lines = await read_lines_until(victim, 40, 60)
    victim.send_signal(signal.SIGKILL)
    out, _ = await asyncio.wait_for(victim.communicate(), 30)
    lines += [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    survivor = await run_workers(dsn, redis, ["hot"], processes=1, retry=False)
    assert [rec for rec in survivor if "error" in rec] == []
    acknowledged = {
        str(rec["key"]): str(rec["prefix"]) for rec in [*lines, *survivor] if "prefix" in rec
    }
    await check_database(db, acknowledged)


async def test_redis_stopped_mid_run(
    kipam_advisory: Kipam,
    db: Database,
    dsn: str,
    start_redis: Callable[[int], subprocess.Popen[bytes]],
    free_port: Callable[[], int],
) -> None:
    """When Redis dies mid-run, allocations go on over advisory locks; nothing overlaps."""
    await make_pools(kipam_advisory, ["hot"])
    port = free_port()
    redis_proc = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    workers = [await spawn(dsn, url, f"w{n}", ["hot"], 60) for n in range(2)]
    first = await read_lines_until(workers[0], 20, 60)
    redis_proc.kill()
    redis_proc.wait(10)
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 120)
    lines = first + [
        json.loads(rec) for out, _ in outputs for rec in out.decode().splitlines() if rec.strip()
    ]
    errors = [rec for rec in lines if "error" in rec]
    assert all(e["error"] == "unavailable" for e in errors), errors
    acknowledged = {str(rec["key"]): str(rec["prefix"]) for rec in lines if "prefix" in rec}
    assert len(acknowledged) + len(errors) == 2 * 4 * 60
    assert len(acknowledged) > 2 * 4 * 60 // 2  # the advisory fallback kept serving
    await check_database(db, acknowledged)


async def test_database_connections_dropped_mid_transaction(
    kipam_advisory: Kipam, db: Database, dsn: str
) -> None:
    """Connections terminated mid-transaction leave nothing half-written and nothing lost."""
    await make_pools(kipam_advisory, ["hot"])
    worker = await spawn(dsn, "-", "w", ["hot"], 150)
    lines = await read_lines_until(worker, 10, 60)
    killed = 0
    assert worker.stdout is not None
    for _ in range(30):  # bounded: terminate the worker's backends while it runs
        killed += len(
            await db.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'kipam' AND pid <> pg_backend_pid()"
                " AND datname = current_database() AND backend_type = 'client backend'"
                " AND query NOT LIKE '%pg_terminate_backend%'"
            )
        )
        await asyncio.sleep(0.02)
    out, err = await asyncio.wait_for(worker.communicate(), 120)
    assert worker.returncode == 0, err.decode()[-2000:]
    lines += [json.loads(rec) for rec in out.decode().splitlines() if rec.strip()]
    errors = [rec for rec in lines if "error" in rec]
    assert all(e["error"] == "unavailable" for e in errors), errors
    acknowledged = {str(rec["key"]): str(rec["prefix"]) for rec in lines if "prefix" in rec}
    assert killed > 0
    assert acknowledged
    await check_database(db, acknowledged)
    # The service recovers: the next allocation works and does not overlap anything.
    allocation, _ = await kipam_advisory.allocate("hot", owner="node/after", length=64)
    assert str(allocation.prefix) not in acknowledged.values()
