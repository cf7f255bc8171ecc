"""PostgreSQL high availability through a multi-host DSN (``target_session_attrs``).

asyncpg tries the hosts of ``postgresql://h1:p1,h2:p2/db?target_session_attrs=read-write`` in
order and keeps the first that answers and accepts writes. Here the first host is a port
nothing listens on (a primary that is down): kipam connects to the second and works.
"""

from __future__ import annotations

import socket
import urllib.parse
from typing import TYPE_CHECKING

import pytest

from service.app import use_cases
from service.store import Database

if TYPE_CHECKING:
    from service.config import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again: nothing listens there


async def test_a_multi_host_dsn_skips_a_host_that_is_down(
    dsn: str, settings: Settings, clean: None
) -> None:
    """The first host is down; the service connects to the next one and allocates."""
    _ = clean
    parts = urllib.parse.urlsplit(dsn)
    query = dict(urllib.parse.parse_qsl(parts.query))
    # The server as the DSN names it: over TCP, or a unix socket directory (embedded, laptops).
    host = query.pop("host", parts.hostname or "")
    port = query.pop("port", str(parts.port or 5432))
    query |= {
        "host": f"127.0.0.1,{host}",
        "port": f"{_dead_port()},{port}",
        "target_session_attrs": "read-write",
    }
    user = f"{parts.username}@" if parts.username else ""
    multi = urllib.parse.urlunsplit(
        (parts.scheme, user, parts.path, urllib.parse.urlencode(query, safe="/,"), "")
    )
    db = await Database.open(multi, settings)
    try:
        async with use_cases(settings, db) as res:
            await res.kipam.create_pool("ha", cidr="fd3c:9e12:7a40::/48")
            allocation, _ = await res.kipam.allocate("ha", owner="node/a", length=64)
            assert str(allocation.prefix) == "fd3c:9e12:7a40::/64"
    finally:
        await db.close()
