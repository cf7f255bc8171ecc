"""WatchAllocations: the history then live changes, resumable without gaps or duplicates."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import asyncpg
import pytest

from service.client import KipamClient
from service.errors import Kind, kind_of
from service.models import PoolPolicy
from tests.api.conftest import serving, until

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable

    from service.config import Settings
    from service.grpc.server import GrpcServer
    from service.models import Change
    from service.store import Database

pytestmark = [pytest.mark.integration, pytest.mark.api]

POLICY = PoolPolicy(default_length=64, quarantine_seconds=0)


async def _take(
    stream: AsyncGenerator[Change, None], count: int, within: float = 10.0
) -> list[Change]:
    """The next ``count`` changes (fewer if the stream ends); closes the stream."""
    out: list[Change] = []
    async with contextlib.aclosing(stream), asyncio.timeout(within):
        async for change in stream:
            out.append(change)
            if len(out) == count:
                break
    return out


async def _history(db: Database) -> list[int]:
    return [r["revision"] for r in await db.fetch("SELECT revision FROM changes ORDER BY 1")]


async def test_resume_on_another_replica_has_no_gap_and_no_duplicate(
    db: Database, settings: Settings, redis_url: str, client: KipamClient
) -> None:
    """Writers on two replicas; a watcher breaks off halfway and resumes on the other one."""
    async with (
        serving(db, settings, redis_url=redis_url) as other,
        KipamClient(f"127.0.0.1:{other.port}") as client_b,
    ):
        for i in range(4):
            await client.create_pool(f"p{i}", cidr=f"fd00:{i + 1}::/48", policy=POLICY)

        async def writer(kipam: KipamClient, pool: str, owner: str) -> None:
            for n in range(15):
                allocation, _ = await kipam.allocate(pool, owner=f"node/{owner}-{n}")
                if n % 3 == 0:
                    await kipam.release(allocation.id)

        writers = asyncio.gather(
            *(writer(client if i % 2 else client_b, f"p{i % 4}", f"w{i}") for i in range(8))
        )
        first = await _take(client.watch(since_revision=0, reconnect=False), 40)
        await writers
        total = len(await _history(db))
        rest = await _take(
            client_b.watch(since_revision=first[-1].revision, reconnect=False),
            total - len(first),
        )
    seen = [c.revision for c in first + rest]
    assert len(seen) == len(set(seen))  # no duplicate
    assert sorted(seen) == await _history(db)  # no gap
    for pool in ("p0", "p1", "p2", "p3"):  # per pool, the order of commits
        revisions = [c.revision for c in first + rest if c.pool == pool]
        assert revisions == sorted(revisions)


async def test_a_later_commit_waits_for_an_earlier_transaction(
    dsn: str, client: KipamClient
) -> None:
    """A change is held back while an older transaction runs, then both come, none skipped."""
    await client.create_pool("p", cidr="fd00:9::/48", policy=POLICY)
    pool, _ = await client.create_pool("q", cidr="fd00:a::/48", policy=POLICY)
    stream = client.watch(since_revision=pool.revision, reconnect=False)
    conn = await asyncpg.connect(dsn)
    try:
        transaction = conn.transaction()
        await transaction.start()
        early = await conn.fetchval(
            "INSERT INTO changes (revision, kind, pool_id, pool_name, pool_generation, actor)"
            " SELECT nextval('kipam_revision'), 'pool.created', id, 'early', 0, 'test'"
            " FROM pools WHERE name = 'q' RETURNING revision"  # q: p's row stays unlocked
        )
        late, _ = await client.allocate("p", owner="node/late")
        assert late.revision > early
        with pytest.raises(TimeoutError):  # the later commit is not delivered alone
            await _take(stream, 1, within=0.5)
        await transaction.commit()
    finally:
        await conn.close()
    stream = client.watch(since_revision=pool.revision, reconnect=False)
    assert [c.revision for c in await _take(stream, 2)] == [early, late.revision]


async def test_from_now_and_by_pool(server: GrpcServer, client: KipamClient) -> None:
    """Without a revision the feed starts now; a pool filter keeps only that pool's changes."""
    await client.create_pool("old", cidr="fd00:7::/48", policy=POLICY)
    await client.allocate("old", owner="node/before")
    everything = client.watch(reconnect=False)
    only_new = client.watch(reconnect=False, pool="new")
    first = asyncio.ensure_future(_take(everything, 2))
    second = asyncio.ensure_future(_take(only_new, 2))
    await until(lambda: server.res.kipam.feed.subscribers == 2)  # both started
    await client.create_pool("new", cidr="fd00:8::/48", policy=POLICY)
    await client.allocate("old", owner="node/after")
    await client.allocate("new", owner="node/new")
    assert [(c.pool, c.kind, c.owner) for c in await first] == [
        ("new", "pool.created", None),
        ("old", "allocation.created", "node/after"),
    ]
    assert [(c.pool, c.kind) for c in await second] == [
        ("new", "pool.created"),
        ("new", "allocation.created"),
    ]


async def test_shutdown_ends_the_stream(db: Database, settings: Settings) -> None:
    """Stopping a server ends its watch streams cleanly, so clients move to another replica."""
    async with serving(db, settings) as server, KipamClient(f"127.0.0.1:{server.port}") as client:
        stream = client.watch(reconnect=False)
        reader = asyncio.ensure_future(_take(stream, 1_000_000))
        await until(lambda: server.res.kipam.feed.subscribers == 1)
        await server.stop(5.0)
        async with asyncio.timeout(5):
            assert await reader == []


async def test_bad_revision_is_invalid(client: KipamClient) -> None:
    """A negative revision is refused with INVALID_ARGUMENT."""
    with pytest.raises(Exception) as caught:  # noqa: PT011
        await _take(client.watch(since_revision=-1, reconnect=False), 1)
    assert kind_of(caught.value) is Kind.INVALID


async def test_client_resumes_across_a_server_restart(
    db: Database, settings: Settings, free_port: Callable[[], int], clean: None
) -> None:
    """The client's watch outlives a restart of the server: every change once, in order."""
    _ = clean
    address = f"127.0.0.1:{free_port()}"
    seen: list[Change] = []
    async with KipamClient(address) as client:
        stream = client.watch(since_revision=0)  # reconnect=True: the controller's way

        async def read() -> None:
            async for change in stream:
                seen.append(change)  # noqa: PERF401 - the test watches it grow

        reader = asyncio.ensure_future(read())
        try:
            for round_ in range(2):
                async with serving(db, settings, address=address):
                    if round_ == 0:
                        await client.create_pool("p", cidr="fd00:1::/48", policy=POLICY)
                    for n in range(5):
                        await client.allocate("p", owner=f"node/r{round_}-{n}")
                    expected = 1 + 5 * (round_ + 1)
                    await until(lambda n=expected: len(seen) == n)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await stream.aclose()
    assert [c.revision for c in seen] == await _history(db)
