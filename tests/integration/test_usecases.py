"""The use cases against a real PostgreSQL, with advisory and Redis locks."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING

import pytest

from engine import PoolExhaustedError, PrefixConflictError, parse_prefix
from service.errors import (
    AllocationNotFoundError,
    AlreadyExistsError,
    InvalidRequestError,
    PoolNotFoundError,
    PreconditionFailedError,
)
from service.models import AllocationRequest, PoolPolicy, RequestContext
from service.usecases import Kipam, parse_selector

if TYPE_CHECKING:
    from service.store import Database

pytestmark = pytest.mark.integration

SITE = "fd12:3456:789a::/48"
NOW_Q = PoolPolicy(quarantine_seconds=0)


async def site(kipam: Kipam, **policy: object) -> None:
    """A root pool `eu1` over SITE handing out /64s by default."""
    await kipam.create_pool(
        "eu1",
        cidr=SITE,
        policy=PoolPolicy(**{"default_length": 64, "quarantine_seconds": 0, **policy}),  # type: ignore[arg-type]
    )


async def test_create_get_list_pools(kipam: Kipam) -> None:
    """Root and child pools are created, read back and listed with filters."""
    pool, _ = await kipam.create_pool("eu1", cidr=SITE, labels={"site": "eu1"})
    assert str(pool.cidr) == SITE
    assert pool.parent is None
    assert pool.space == "default"
    child, _ = await kipam.create_pool(
        "eu1-prod/pod", parent="eu1", prefix_length=52, role="pod", policy=NOW_Q
    )
    assert str(child.cidr) == "fd12:3456:789a::/52"
    assert child.parent == "eu1"
    assert (await kipam.get_pool("eu1-prod/pod")).cidr == child.cidr
    names = [p.name for p in (await kipam.list_pools()).items]
    assert names == ["eu1", "eu1-prod/pod"]
    assert [p.name for p in (await kipam.list_pools(role="pod")).items] == ["eu1-prod/pod"]
    assert [p.name for p in (await kipam.list_pools(selector="site=eu1")).items] == ["eu1"]
    assert [p.name for p in (await kipam.list_pools(parent="eu1")).items] == ["eu1-prod/pod"]
    page = await kipam.list_pools(limit=1)
    assert [p.name for p in page.items] == ["eu1"]
    assert page.next_cursor == "eu1"
    rest = await kipam.list_pools(after=page.next_cursor)
    assert [p.name for p in rest.items] == ["eu1-prod/pod"]
    assert rest.next_cursor is None
    # The child's CIDR is an allocation held in the parent.
    [held] = (await kipam.list_allocations(pool="eu1")).items
    assert held.owner == "pool/eu1-prod/pod"
    assert held.prefix == child.cidr


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"cidr": "fd12:3456:789a::1/48"}, InvalidRequestError, "host bits"),
        ({"cidr": "2001:db8::/32"}, InvalidRequestError, "documentation"),
        ({"cidr": "fe80::/10"}, InvalidRequestError, "fe80::/10"),
        ({"cidr": SITE, "role": "vip"}, InvalidRequestError, "role"),
        ({}, InvalidRequestError, "needs a cidr"),
        ({"cidr": SITE, "prefix_length": 64}, InvalidRequestError, "prefix_length"),
        (
            {"cidr": SITE, "policy": PoolPolicy(default_length=62)},
            InvalidRequestError,
            "default_length",
        ),
        ({"cidr": SITE, "labels": {"bad key!": "x"}}, InvalidRequestError, "label key"),
        ({"parent": "nope", "prefix_length": 56}, PoolNotFoundError, "nope"),
    ],
)
async def test_create_pool_refuses_bad_input(
    kipam: Kipam, kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    """Invalid pools are refused with a specific error and nothing is written."""
    with pytest.raises(error, match=words):
        await kipam.create_pool("bad", **kwargs)  # type: ignore[arg-type]
    assert (await kipam.list_pools()).items == []


async def test_documentation_ranges_need_opt_in(kipam: Kipam) -> None:
    """A root pool in 2001:db8::/32 is accepted when its policy opts in."""
    pool, _ = await kipam.create_pool(
        "docs", cidr="2001:db8::/32", policy=PoolPolicy(allow_documentation=True)
    )
    assert str(pool.cidr) == "2001:db8::/32"


async def test_root_pools_of_a_space_never_overlap(kipam: Kipam) -> None:
    """An overlapping root pool is refused in one space and allowed in another."""
    await kipam.create_pool("a", cidr=SITE)
    with pytest.raises(AlreadyExistsError, match="overlaps another root pool"):
        await kipam.create_pool("b", cidr="fd12:3456::/32")
    with pytest.raises(AlreadyExistsError, match="name"):
        await kipam.create_pool("a", cidr="fd99::/48")
    other, _ = await kipam.create_pool("b", cidr="fd12:3456::/32", space="lab")
    assert other.space == "lab"


async def test_allocate_by_length_exact_and_idempotent(kipam: Kipam) -> None:
    """Allocations by length and exact prefix succeed; a retried key returns the same one."""
    await site(kipam)
    first, created = await kipam.allocate("eu1", owner="node/w1", idempotency_key="w1")
    assert created
    assert str(first.prefix) == "fd12:3456:789a::/64"
    assert first.state == "active"
    assert first.revision > 0
    again, created = await kipam.allocate("eu1", owner="node/w1", idempotency_key="w1")
    assert not created
    assert again == first
    exact, _ = await kipam.allocate("eu1", owner="node/w2", prefix="fd12:3456:789a:ff::/64")
    assert str(exact.prefix) == "fd12:3456:789a:ff::/64"
    with pytest.raises(PrefixConflictError) as info:
        await kipam.allocate("eu1", owner="node/w3", prefix="fd12:3456:789a:f0::/60")
    assert [str(c) for c in info.value.conflicts] == ["fd12:3456:789a:ff::/64"]
    with pytest.raises(AlreadyExistsError, match="different request"):
        await kipam.allocate("eu1", owner="node/other", idempotency_key="w1")
    assert len((await kipam.list_allocations(pool="eu1")).items) == 2


async def test_dry_run_writes_nothing(kipam: Kipam) -> None:
    """A dry run answers the prefix that would be taken and holds nothing."""
    await site(kipam)
    preview, _ = await kipam.allocate("eu1", owner="node/w1", dry_run=True)
    assert preview.id == 0
    assert (await kipam.list_allocations()).items == []
    real, _ = await kipam.allocate("eu1", owner="node/w1")
    assert real.prefix == preview.prefix


async def test_exhaustion_and_batch_all_or_nothing(kipam: Kipam) -> None:
    """A full pool refuses; a batch that cannot be served whole writes nothing."""
    await kipam.create_pool("tiny", cidr="fd12:3456:789a::/62", policy=PoolPolicy(alignment_bits=1))
    requests = [AllocationRequest(owner=f"node/w{i}", length=64) for i in range(5)]
    with pytest.raises(PoolExhaustedError):
        await kipam.allocate_many("tiny", requests)
    assert (await kipam.list_allocations()).items == []
    answers = await kipam.allocate_many("tiny", requests[:4])
    assert [str(a.prefix) for a, _ in answers] == [
        "fd12:3456:789a::/64",
        "fd12:3456:789a:1::/64",
        "fd12:3456:789a:2::/64",
        "fd12:3456:789a:3::/64",
    ]
    with pytest.raises(PoolExhaustedError, match="no free /64"):
        await kipam.allocate("tiny", owner="node/w9", length=64)


async def test_release_quarantine_and_reuse(kipam: Kipam, db: Database) -> None:
    """Released prefixes wait out the quarantine, then are handed out again."""
    await site(kipam, quarantine_seconds=3600)
    first, _ = await kipam.allocate("eu1", owner="node/w1")
    released = await kipam.release(first.id, ctx=RequestContext(actor="test"))
    assert released.state == "quarantined"
    assert released.released_at is not None
    assert released.reusable_at is not None
    assert released.reusable_at - released.released_at == dt.timedelta(hours=1)
    assert (await kipam.release(first.id)).state == "quarantined"  # idempotent
    second, _ = await kipam.allocate("eu1", owner="node/w2")
    assert second.prefix != first.prefix  # still in quarantine
    # Time passes: the quarantine ends, for the database and for this process.
    async with db.connection() as conn:
        await conn.execute(
            "UPDATE allocations SET reusable_at = released_at WHERE id = $1", first.id
        )
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    kipam.clock = lambda: later
    third, _ = await kipam.allocate("eu1", owner="node/w3")
    assert third.prefix == first.prefix
    assert (await kipam.get_allocation(first.id)).state == "released"


async def test_release_without_quarantine_is_immediate(kipam: Kipam) -> None:
    """With no quarantine a released prefix is free again at once."""
    await site(kipam)
    first, _ = await kipam.allocate("eu1", owner="node/w1")
    assert (await kipam.release(first.id)).state == "released"
    again, _ = await kipam.allocate("eu1", owner="node/w2")
    assert again.prefix == first.prefix
    with pytest.raises(AllocationNotFoundError):
        await kipam.release(999_999)


async def test_child_pool_lifecycle(kipam: Kipam) -> None:
    """A child pool cannot be deleted while it holds prefixes; afterwards its CIDR is freed."""
    await site(kipam)
    child, _ = await kipam.create_pool("c1/pod", parent="eu1", prefix_length=56, policy=NOW_Q)
    held, _ = await kipam.allocate("c1/pod", owner="node/w1", length=64)
    assert child.cidr.contains(held.prefix)
    [parent_alloc] = (await kipam.list_allocations(pool="eu1")).items
    with pytest.raises(PreconditionFailedError, match="child pool"):
        await kipam.release(parent_alloc.id)
    with pytest.raises(PreconditionFailedError, match="still holds 1"):
        await kipam.delete_pool("c1/pod")
    await kipam.release(held.id)
    await kipam.delete_pool("c1/pod")
    with pytest.raises(PoolNotFoundError):
        await kipam.get_pool("c1/pod")
    assert (await kipam.get_allocation(parent_alloc.id)).state == "released"
    again, _ = await kipam.create_pool("c1/pod", parent="eu1", prefix_length=56)
    assert again.cidr == child.cidr
    with pytest.raises(PreconditionFailedError, match="still holds"):
        await kipam.delete_pool("eu1")


async def test_lookup_now_and_in_the_past(kipam: Kipam) -> None:
    """Lookup answers who holds an address now, and who held it at a past time."""
    await site(kipam)
    child, _ = await kipam.create_pool("c1/node", parent="eu1", prefix_length=56, policy=NOW_Q)
    held, _ = await kipam.allocate("c1/node", owner="node/w1", length=64)
    address = str(held.prefix.to_network().network_address + 9)
    found = await kipam.lookup(address)
    assert [(a.pool, str(a.prefix)) for a in found] == [
        ("c1/node", str(held.prefix)),
        ("eu1", str(child.cidr)),
    ]
    during = dt.datetime.now(dt.UTC)
    await kipam.release(held.id)
    assert [a.pool for a in await kipam.lookup(address)] == ["eu1"]
    then = await kipam.lookup(address, at=during)
    assert [(a.owner, a.state) for a in then] == [
        ("node/w1", "released"),
        ("pool/c1/node", "active"),
    ]
    before = held.created_at - dt.timedelta(microseconds=1)
    assert [a.pool for a in await kipam.lookup(address, at=before)] == ["eu1"]
    with pytest.raises(InvalidRequestError, match="zone"):
        await kipam.lookup("fe80::1%eth0")


async def test_usage_and_available(kipam: Kipam) -> None:
    """Usage and available prefixes come from the engine and match what was done."""
    await site(kipam, reserved=(parse_prefix("fd12:3456:789a:ffff::/64"),))
    for i in range(3):
        await kipam.allocate("eu1", owner=f"node/w{i}")
    usage = await kipam.usage("eu1", length=64)
    assert usage.allocations == 3
    assert usage.allocated == 3 * 2**64
    assert usage.reserved == 2**64
    assert usage.free_blocks == 2**16 - 4
    assert usage.quarantined == 0
    assert [str(p) for p in await kipam.available("eu1", length=64, limit=2)] == [
        "fd12:3456:789a:3::/64",
        "fd12:3456:789a:4::/64",
    ]
    with pytest.raises(InvalidRequestError):
        await kipam.usage("eu1", length=40)


async def test_list_allocations_filters_and_pages(kipam: Kipam) -> None:
    """Allocations list by owner, label selector and state, in keyset pages."""
    await site(kipam, quarantine_seconds=60)
    made = []
    for i in range(5):
        allocation, _ = await kipam.allocate(
            "eu1", owner=f"node/w{i}", labels={"rack": "r1" if i % 2 else "r2"}
        )
        made.append(allocation)
    await kipam.release(made[0].id)
    assert [a.owner for a in (await kipam.list_allocations(owner="node/w3")).items] == ["node/w3"]
    assert len((await kipam.list_allocations(selector="rack=r1")).items) == 2
    assert len((await kipam.list_allocations(selector="rack!=r1")).items) == 3
    assert len((await kipam.list_allocations(selector="rack,!zone")).items) == 5
    assert [a.id for a in (await kipam.list_allocations(state="quarantined")).items] == [made[0].id]
    assert len((await kipam.list_allocations(family=6)).items) == 5
    page = await kipam.list_allocations(limit=2)
    ids = [a.id for a in page.items]
    while page.next_cursor:
        page = await kipam.list_allocations(limit=2, after=page.next_cursor)
        ids += [a.id for a in page.items]
    assert ids == [a.id for a in made]
    for bad in ({"state": "gone"}, {"limit": 0}, {"limit": 5000}, {"after": "x"}, {"family": 5}):
        with pytest.raises(InvalidRequestError):
            await kipam.list_allocations(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"owner": "worker 1"}, "owner"),
        ({"owner": "node/w", "labels": {"k": "v" * 64}}, "labels"),
        ({"owner": "node/w", "labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
        ({"owner": "node/w", "prefix": "10.0.0.0/24"}, "prefix"),
        ({"owner": "node/w", "prefix": "fd12:3456:789a::1/64"}, "prefix"),
        ({"owner": "node/w", "length": 64, "prefix": "fd12:3456:789a::/64"}, "prefix"),
        ({"owner": "node/w", "idempotency_key": "k" * 300}, "idempotency_key"),
    ],
)
async def test_allocate_refuses_bad_input(
    kipam: Kipam, kwargs: dict[str, object], field: str
) -> None:
    """Bad allocation requests name the wrong field and write nothing."""
    await site(kipam)
    with pytest.raises(InvalidRequestError) as info:
        await kipam.allocate("eu1", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert (await kipam.list_allocations()).items == []


async def test_unknown_pool(kipam: Kipam) -> None:
    """Operations on a pool that does not exist are NOT_FOUND."""
    with pytest.raises(PoolNotFoundError):
        await kipam.allocate("nope", owner="node/w1", length=64)
    with pytest.raises(PoolNotFoundError):
        await kipam.usage("nope")
    with pytest.raises(InvalidRequestError):
        await kipam.get_pool("Not A Name")


async def test_concurrent_requests_are_served_together(kipam: Kipam) -> None:
    """Concurrent requests on one pool all succeed with distinct prefixes in few transactions."""
    await site(kipam)
    answers = await asyncio.gather(
        *(kipam.allocate("eu1", owner=f"node/w{i}", idempotency_key=f"k{i}") for i in range(200))
    )
    prefixes = {a.prefix for a, _ in answers}
    assert len(prefixes) == 200
    pool = await kipam.get_pool("eu1")
    assert pool.generation < 200  # group commit: fewer transactions than requests
    retried = await asyncio.gather(
        *(kipam.allocate("eu1", owner=f"node/w{i}", idempotency_key=f"k{i}") for i in range(200))
    )
    assert [a.prefix for a, _ in retried] == [a.prefix for a, _ in answers]


async def test_history_records_every_change(kipam: Kipam, db: Database) -> None:
    """Every change has a revision and a history row with actor, request id and trace id."""
    await site(kipam)
    ctx = RequestContext(
        actor="alice", request_id="req-1", trace_id="0af7651916cd43dd8448eb211c80319c"
    )
    allocation, _ = await kipam.allocate("eu1", owner="node/w1", ctx=ctx)
    await kipam.release(allocation.id, ctx=RequestContext(actor="bob", request_id="req-2"))
    rows = await db.fetch(
        "SELECT revision, kind, actor, request_id, trace_id FROM changes ORDER BY revision"
    )
    assert [r["kind"] for r in rows] == [
        "pool.created",
        "allocation.created",
        "allocation.released",
    ]
    assert [r["actor"] for r in rows[1:]] == ["alice", "bob"]
    assert rows[1]["trace_id"] == ctx.trace_id
    revisions = [r["revision"] for r in rows]
    assert revisions == sorted(set(revisions))


def test_parse_selector() -> None:
    """Selectors parse as Kubernetes writes them; malformed terms are refused."""
    assert parse_selector("a=1, b!=2,c,!d,e==3") == [
        ("a", "=", "1"),
        ("b", "!=", "2"),
        ("c", "exists", None),
        ("d", "!exists", None),
        ("e", "=", "3"),
    ]
    assert parse_selector(" ") == []
    for bad in ("a=1,", "!a=1", "a b", "=1"):
        with pytest.raises(InvalidRequestError):
            parse_selector(bad)


async def test_replicas_interleaving_on_one_pool_stay_disjoint(kipam: Kipam, db: Database) -> None:
    """Two replicas take turns on a pool: fenced writes fall back, nothing overlaps or is lost."""
    await site(kipam)
    other = Kipam(db, kipam.locks)
    try:
        taken = []
        for n in range(20):
            replica = kipam if n % 2 else other
            allocation, _ = await replica.allocate("eu1", owner=f"node/w{n}")
            taken.append(allocation.prefix)
        assert len(set(taken)) == 20
        rows = await db.fetch("SELECT prefix FROM allocations WHERE state = 'active'")
        assert sorted(r["prefix"] for r in rows) == sorted(taken)
    finally:
        await other.close()


async def test_a_pool_deleted_by_another_replica_is_not_written(kipam: Kipam, db: Database) -> None:
    """The fence sees a pool deleted elsewhere: nothing is written, the caller gets NOT_FOUND."""
    await site(kipam)
    first, _ = await kipam.allocate("eu1", owner="node/w1")  # learns the pool
    other = Kipam(db, kipam.locks)
    try:
        await other.release(first.id)
        await other.delete_pool("eu1")
    finally:
        await other.close()
    with pytest.raises(PoolNotFoundError):
        await kipam.allocate("eu1", owner="node/w2")
    rows = await db.fetch("SELECT owner FROM allocations")
    assert [r["owner"] for r in rows] == ["node/w1"]
