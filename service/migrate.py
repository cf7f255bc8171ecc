"""Forward-only SQL migrations, applied in order, each in its own transaction.

Migrations are the files ``migrations/NNNN_description.sql`` shipped inside the package.
``kipam migrate`` (and ``kipam serve`` when asked) applies the ones the database has not
seen. The runner is ours rather than a library's: what it needs is small (ordered files, one
transaction each, a table of what was applied with checksums, and an advisory lock so that
several replicas or a Helm hook can run it at the same moment), and the libraries that do
this either bring an ORM (Alembic needs SQLAlchemy) or a synchronous driver (yoyo, on
psycopg), where kipam runs on asyncpg alone.

Rules:
- a migration that was applied is never edited: its checksum is recorded and a mismatch
  stops the runner with an error naming the file;
- versions the database knows but this code does not (a newer release migrated first) are
  reported, not an error: migrations are written to be compatible with the release before.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final

from service.errors import PreconditionFailedError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Migration", "MigrationStatus", "available", "migrate", "status"]

# pg_advisory_lock key that serializes runners: "kipam" in ASCII, then 1 for migrations.
LOCK_KEY: Final = 0x6B6970616D_01
_NAME: Final = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.sql")
_TABLE: Final = """
CREATE TABLE IF NOT EXISTS kipam_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """What the database has, against what this code ships."""

    applied: tuple[int, ...]
    pending: tuple[int, ...]
    unknown: tuple[int, ...]

    @property
    def current(self) -> bool:
        """Whether every migration this code ships has been applied."""
        return not self.pending


def available() -> list[Migration]:
    """The migrations shipped with this code, in version order."""
    found: list[Migration] = []
    for entry in resources.files("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(
                Migration(int(match["version"]), entry.name, entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):  # pragma: no cover - a packaging mistake
        raise AssertionError(f"two migrations share a version: {versions}")
    return found


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('kipam_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM kipam_migrations")
    return {int(r["version"]): str(r["checksum"]) for r in rows}


async def status(conn: asyncpg.Connection) -> MigrationStatus:
    """Compare the database with the shipped migrations, without changing anything."""
    applied = await _applied(conn)
    shipped = {m.version for m in available()}
    return MigrationStatus(
        applied=tuple(sorted(applied)),
        pending=tuple(sorted(shipped - applied.keys())),
        unknown=tuple(sorted(applied.keys() - shipped)),
    )


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every pending migration; safe to run from several processes at once.

    Returns:
        The names of the migrations applied by this call (empty when already current).

    Raises:
        PreconditionFailedError: an applied migration's file has changed since.
    """
    done: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_TABLE)
        applied = await _applied(conn)
        for migration in available():
            checksum = applied.get(migration.version)
            if checksum is not None:
                if checksum != migration.checksum:
                    raise PreconditionFailedError(
                        f"Migration {migration.name} was changed after it was applied; "
                        "migrations are forward-only: add a new one instead."
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO kipam_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return done
