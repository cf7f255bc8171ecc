"""The service's parts over the real servers of ``tests/conftest.py``.

Each test session migrates a database of its own from empty (so migrations are tested on
every run) and drops it at the end; each test starts from empty tables.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import asyncpg
import pytest
import pytest_asyncio

from service.config import Settings
from service.locks import LockManager
from service.migrate import migrate
from service.store import Database
from service.usecases import Kipam

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest_asyncio.fixture(name="dsn", scope="session", loop_scope="session")
async def _dsn(session_database: str) -> str:
    """The session's database, migrated from empty."""
    conn = await asyncpg.connect(session_database)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return session_database


@pytest.fixture(name="settings", scope="session")
def _settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the service under test: small pools, short lock waits."""
    data_dir: Path = tmp_path_factory.mktemp("data")
    return Settings(
        data_dir=data_dir, lock_wait_s=5.0, lock_ttl_s=5.0, db_pool_min=1, db_pool_max=8
    )


@pytest_asyncio.fixture(name="db", scope="session", loop_scope="session")
async def _db(dsn: str, settings: Settings) -> AsyncIterator[Database]:
    """The service's connection pool on the session's database."""
    database = await Database.open(dsn, settings)
    yield database
    await database.close()


@pytest_asyncio.fixture(name="clean", loop_scope="session")
async def _clean(db: Database) -> None:
    """Empty tables, with the default space back."""
    async with db.connection() as conn:
        await conn.execute(
            """
            TRUNCATE changes, allocations, pools, spaces RESTART IDENTITY CASCADE;
            DO $$
            DECLARE part regclass;
            BEGIN  -- each pool's partition goes with it (pool ids start again from 1)
                FOR part IN SELECT inhrelid::regclass FROM pg_inherits
                             WHERE inhparent = 'allocations'::regclass LOOP
                    EXECUTE format('ALTER TABLE allocations DETACH PARTITION %s', part);
                    EXECUTE format('DROP TABLE %s', part);
                END LOOP;
            END $$;
            INSERT INTO spaces (name) VALUES ('default');
            """
        )


@pytest_asyncio.fixture(name="kipam", loop_scope="session", params=["advisory", "redis"])
async def _kipam(
    request: pytest.FixtureRequest, db: Database, redis_url: str, clean: None
) -> AsyncIterator[Kipam]:
    """The use cases over the real database, with either lock backend."""
    _ = clean
    locks = LockManager(redis_url if request.param == "redis" else None, wait_s=5.0, ttl_s=5.0)
    await locks.start()
    kipam = Kipam(db, locks)
    try:
        yield kipam
    finally:
        await kipam.close()
        await locks.close()


@pytest_asyncio.fixture(name="kipam_advisory", loop_scope="session")
async def _kipam_advisory(db: Database, clean: None) -> AsyncIterator[Kipam]:
    """The use cases with advisory locks only (for tests that need one backend)."""
    _ = clean
    locks = LockManager(None)
    await locks.start()
    kipam = Kipam(db, locks)
    try:
        yield kipam
    finally:
        with contextlib.suppress(Exception):
            await kipam.close()
        await locks.close()
