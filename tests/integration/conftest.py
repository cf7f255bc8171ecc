"""The use cases over the real servers and the migrated database of ``tests/conftest.py``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest_asyncio

from service.locks import LockManager
from service.usecases import Kipam

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import pytest

    from service.store import Database


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
