"""The database enforces the invariants by itself: attacked here with plain SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
from typing import TYPE_CHECKING

import asyncpg
import pytest

from service.migrate import available, migrate, status
from service.store import Database

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from service.config import Settings

pytestmark = pytest.mark.integration

POOL = "fd12:3456:789a::/48"


@pytest.fixture(name="conn")
async def _conn(db: Database, clean: None) -> AsyncIterator[asyncpg.Connection]:
    """A connection on the session's database, with a pool `eu1` (id 1) over POOL."""
    _ = clean
    async with db.connection() as conn:
        await conn.execute(
            "INSERT INTO pools (space_id, name, cidr, role, policy, revision)"
            " VALUES (1, 'eu1', $1, 'container', $2, 1)",
            POOL,
            {"reserved": ["fd12:3456:789a:ffff::/64"]},
        )
        yield conn


async def insert(conn: asyncpg.Connection, prefix: str, **extra: object) -> None:
    """Insert an allocation row directly, bypassing the service."""
    columns = {"pool_id": 1, "pool_cidr": POOL, "prefix": prefix, "owner": "node/x", "revision": 1}
    columns.update(extra)
    names = ", ".join(columns)
    params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    await conn.execute(f"INSERT INTO allocations ({names}) VALUES ({params})", *columns.values())


@pytest.mark.parametrize(
    ("held", "attack"),
    [
        ("fd12:3456:789a:1::/64", "fd12:3456:789a:1::/64"),
        ("fd12:3456:789a:1::/64", "fd12:3456:789a::/56"),
        ("fd12:3456:789a::/56", "fd12:3456:789a:1::/64"),
    ],
    ids=["same", "covering", "inside"],
)
async def test_overlapping_held_allocations_are_refused(
    conn: asyncpg.Connection, held: str, attack: str
) -> None:
    """Two held allocations of one pool can never overlap, whatever the code does."""
    await insert(conn, held)
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await insert(conn, attack)


async def test_quarantined_still_blocks_and_released_does_not(conn: asyncpg.Connection) -> None:
    """A quarantined allocation still holds its prefix; a released one no longer does."""
    await insert(conn, "fd12:3456:789a:1::/64")
    await conn.execute(
        "UPDATE allocations SET state = 'quarantined', released_at = now(),"
        " reusable_at = now() + interval '1 hour'"
    )
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await insert(conn, "fd12:3456:789a:1::/64")
    await conn.execute("UPDATE allocations SET state = 'released'")
    await insert(conn, "fd12:3456:789a:1::/64")


@pytest.mark.parametrize(
    ("prefix", "pool_cidr", "error"),
    [
        ("fd12:3456:789b::/64", POOL, asyncpg.exceptions.CheckViolationError),
        ("10.0.0.0/24", POOL, asyncpg.exceptions.CheckViolationError),
        ("fd99::/64", "fd99::/48", asyncpg.exceptions.ForeignKeyViolationError),
        ("fd12:3456:789a:ffff::/64", POOL, asyncpg.exceptions.ExclusionViolationError),
        ("fd12:3456:789a:ff00::/56", POOL, asyncpg.exceptions.ExclusionViolationError),
    ],
    ids=["outside", "other-family", "lying-about-pool-cidr", "reserved", "covers-reserved"],
)
async def test_allocations_stay_inside_pool_and_outside_reserved(
    conn: asyncpg.Connection, prefix: str, pool_cidr: str, error: type[Exception]
) -> None:
    """An allocation outside its pool, or over a reserved range, is refused by the database."""
    with pytest.raises(error):
        await insert(conn, prefix, pool_cidr=pool_cidr)


async def test_idempotency_key_is_unique_per_pool(conn: asyncpg.Connection) -> None:
    """The same idempotency key cannot be stored twice in one pool."""
    await insert(conn, "fd12:3456:789a:1::/64", idempotency_key="k")
    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        await insert(conn, "fd12:3456:789a:2::/64", idempotency_key="k")


@pytest.mark.parametrize(
    ("update", "constraint"),
    [
        ("SET state = 'active', released_at = NULL, reusable_at = NULL", "allocations_transition"),
        ("SET prefix = 'fd12:3456:789a:9::/64'", "allocations_write_once"),
        ("SET owner = 'node/else'", "allocations_write_once"),
        ('SET labels = \'{"a": "b"}\'', "allocations_transition"),
    ],
)
async def test_released_rows_are_history(
    conn: asyncpg.Connection, update: str, constraint: str
) -> None:
    """States only move forward and history rows never change or disappear."""
    await insert(conn, "fd12:3456:789a:1::/64")
    await conn.execute(
        "UPDATE allocations SET state = 'released', released_at = now(), reusable_at = now()"
    )
    with pytest.raises(asyncpg.exceptions.CheckViolationError) as info:
        await conn.execute(f"UPDATE allocations {update}")
    assert constraint in str(info.value) or info.value.constraint_name == constraint
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await conn.execute("DELETE FROM allocations")


@pytest.mark.parametrize(
    "values",
    [
        "state = 'quarantined', released_at = now()",  # no reusable_at
        "state = 'active', released_at = now()",
        "state = 'gone'",
    ],
)
async def test_state_columns_agree(conn: asyncpg.Connection, values: str) -> None:
    """Release and reuse times always match the state."""
    await insert(conn, "fd12:3456:789a:1::/64")
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await conn.execute(f"UPDATE allocations SET {values}")


async def test_root_pools_cannot_overlap(conn: asyncpg.Connection) -> None:
    """Two live root pools of one space cannot overlap."""
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await conn.execute(
            "INSERT INTO pools (space_id, name, cidr, role, policy, revision)"
            " VALUES (1, 'eu2', 'fd12:3456::/32', 'container', '{}', 2)"
        )


@pytest.mark.parametrize("name", ["eu2/usage", "eu2/a/allocations", "available"])
async def test_pool_names_never_end_in_a_rest_subresource(
    conn: asyncpg.Connection, name: str
) -> None:
    """A name REST could not address (its last segment is a sub-resource) is refused."""
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await conn.execute(
            "INSERT INTO pools (space_id, name, cidr, role, policy, revision)"
            " VALUES (1, $1, 'fd12:3457::/48', 'container', '{}', 2)",
            name,
        )


async def test_pool_idempotency_keys_are_unique(conn: asyncpg.Connection) -> None:
    """Two pools cannot share an idempotency key."""
    insert_pool = (
        "INSERT INTO pools (space_id, name, cidr, role, policy, revision, idempotency_key)"
        " VALUES (1, $1, $2, 'container', '{}', 2, 'key')"
    )
    await conn.execute(insert_pool, "a", "fd12:3457::/48")
    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        await conn.execute(insert_pool, "b", "fd12:3458::/48")


async def test_address_queries_use_the_prefix_index(conn: asyncpg.Connection) -> None:
    """Containing-address and inside-prefix queries are index scans, in partitions and the log."""
    await conn.execute("SET enable_seqscan = off")
    try:
        for query, index in (
            ("SELECT id FROM allocations WHERE prefix >>= 'fd12:3456:789a::5'::inet", "prefix"),
            ("SELECT id FROM allocations WHERE prefix <<= 'fd12:3456:789a::/56'::inet", "prefix"),
            ("SELECT revision FROM changes WHERE prefix >>= 'fd12::5'::inet", "changes_prefix"),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {query}"))
            assert re.search(rf"Index Scan (on|using) \w*{index}", plan), plan
    finally:
        await conn.execute("RESET enable_seqscan")


async def test_each_pool_has_its_own_partition(conn: asyncpg.Connection) -> None:
    """Creating a pool creates its partition; pools do not constrain each other's prefixes."""
    space = await conn.fetchval("INSERT INTO spaces (name) VALUES ('lab') RETURNING id")
    await conn.execute(
        "INSERT INTO pools (space_id, name, cidr, role, policy, revision)"
        " VALUES ($1, 'lab', $2, 'container', '{}', 2)",
        space,
        POOL,
    )
    parts = await conn.fetch(
        "SELECT inhrelid::regclass::text AS part FROM pg_inherits"
        " WHERE inhparent = 'allocations'::regclass ORDER BY 1"
    )
    assert [r["part"] for r in parts] == ["allocations_p1", "allocations_p2"]
    await insert(conn, "fd12:3456:789a:1::/64")
    await insert(conn, "fd12:3456:789a:1::/64", pool_id=2)  # same prefix, another pool


# -- migrations -----------------------------------------------------------------------------


async def test_migrate_from_empty_then_again(empty_database: str) -> None:
    """Migrating an empty database applies everything; a second run applies nothing."""
    conn = await asyncpg.connect(empty_database)
    try:
        assert (await status(conn)).pending == tuple(m.version for m in available())
        assert await migrate(conn) == [m.name for m in available()]
        assert await migrate(conn) == []
        assert (await status(conn)).current
    finally:
        await conn.close()


async def test_migrate_concurrently_from_processes(empty_database: str) -> None:
    """Several processes migrating at once apply each migration exactly once."""
    code = (
        "import asyncio, asyncpg, json, sys\n"
        "from service.migrate import migrate\n"
        "async def main():\n"
        "    conn = await asyncpg.connect(sys.argv[1])\n"
        "    print(json.dumps(await migrate(conn)))\n"
        "    await conn.close()\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, empty_database, stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    applied = [name for out, _ in outputs for name in __import__("json").loads(out)]
    assert sorted(applied) == [m.name for m in available()]
    conn = await asyncpg.connect(empty_database)
    try:
        assert (await status(conn)).current
    finally:
        await conn.close()


async def test_an_edited_migration_is_refused(empty_database: str) -> None:
    """A migration whose file changed after it was applied stops the runner."""
    conn = await asyncpg.connect(empty_database)
    try:
        await migrate(conn)
        await conn.execute("UPDATE kipam_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(Exception, match="changed after it was applied"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_a_connection_left_in_a_transaction_is_rolled_back_on_release(
    settings: Settings, dsn: str
) -> None:
    """The pool's cheap reset still rolls back a connection released inside a transaction."""
    database = await Database.open(dsn, dataclasses.replace(settings, db_pool_max=1))
    try:

        async def interrupted() -> None:
            async with database.connection() as conn:
                await conn.execute("BEGIN; CREATE TEMP TABLE left_behind (x int)")
                raise RuntimeError

        with pytest.raises(RuntimeError):
            await interrupted()
        async with database.connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_behind')") is None
    finally:
        await database.close()
