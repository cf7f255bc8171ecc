"""A separate OS process that allocates through the use cases, for the concurrency tests.

Usage: ``python alloc_worker.py DSN REDIS_URL|- NAME POOLS TASKS COUNT [RETRY]``

Runs TASKS asyncio tasks, each allocating COUNT /64s round-robin over the comma-separated
POOLS with idempotency keys ``NAME-task-i``. Every acknowledged allocation is printed at
once as a JSON line ``{"key", "pool", "prefix"}`` (flushed, so a test that kills this process
still knows what was acknowledged); failures are printed as ``{"key", "error"}``. With RETRY
set, each acknowledged key is then asked for again and printed as ``{"retry", "prefix"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from service.config import Settings
from service.errors import ServiceError
from service.locks import LockManager
from service.store import Database
from service.usecases import Kipam


def emit(record: dict[str, object]) -> None:
    """Print one JSON line and flush it."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def main(argv: list[str]) -> int:
    """Allocate as told; exit 0 when every request got an answer."""
    dsn, redis_url, name, pools_arg, tasks_arg, count_arg, *rest = argv
    pools = pools_arg.split(",")
    settings = Settings(db_pool_min=1, db_pool_max=4, lock_wait_s=20.0, lock_ttl_s=2.0)
    db = await Database.open(dsn, settings)
    locks = LockManager(None if redis_url == "-" else redis_url, wait_s=20.0, ttl_s=2.0)
    await locks.start()
    kipam = Kipam(db, locks)
    acknowledged: dict[str, tuple[str, str]] = {}

    async def task(t: int) -> None:
        for i in range(int(count_arg)):
            key = f"{name}-{t}-{i}"
            pool = pools[(t + i) % len(pools)]
            try:
                allocation, _ = await kipam.allocate(
                    pool, owner=f"node/{key}", length=64, idempotency_key=key
                )
            except ServiceError as exc:
                emit({"key": key, "error": exc.kind.value, "message": exc.message})
                continue
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                emit({"key": key, "error": type(exc).__name__, "message": str(exc)})
                continue
            acknowledged[key] = (pool, str(allocation.prefix))
            emit({"key": key, "pool": pool, "prefix": str(allocation.prefix)})

    await asyncio.gather(*(task(t) for t in range(int(tasks_arg))))
    if rest:
        for key, (pool, prefix) in acknowledged.items():
            again, created = await kipam.allocate(
                pool, owner=f"node/{key}", length=64, idempotency_key=key
            )
            emit({"retry": key, "prefix": str(again.prefix), "created": created, "was": prefix})
    await kipam.close()
    await locks.close()
    await db.close()
    return 0


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(sys.argv[1:])))
