"""Cluster plans over the real database: atomic, idempotent, checked before anything is written."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING

import pytest

from engine import PoolExhaustedError, parse_prefix
from engine.errors import ClusterCheckError, PolicyViolationError
from service.clusters import EgressIdentity
from service.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    PreconditionFailedError,
    ResourceNotFoundError,
)
from service.models import RequestContext

if TYPE_CHECKING:
    from service.usecases import Kipam

pytestmark = pytest.mark.asyncio(loop_scope="session")

SITE = "fd3c:9e12:7a00::/40"


async def sites(kipam: Kipam, *, ipv4: bool = False) -> None:
    """The site pools clusters are carved from."""
    await kipam.create_pool("site", cidr=SITE)
    if ipv4:
        await kipam.create_pool("site4", cidr="10.0.0.0/8")


async def counts(kipam: Kipam) -> tuple[int, int, int, int]:
    """How many pools, allocations, changes and clusters exist."""
    row = await kipam.db.fetchrow(
        "SELECT (SELECT count(*) FROM pools) AS pools, (SELECT count(*) FROM allocations) AS a,"
        " (SELECT count(*) FROM changes) AS c, (SELECT count(*) FROM clusters) AS k"
    )
    assert row is not None
    return row["pools"], row["a"], row["c"], row["k"]


async def test_plan_carves_block_and_five_role_pools(kipam: Kipam) -> None:
    """A /48 block and five role pools inside it; the same plan again is a replay."""
    await sites(kipam)
    cluster, created = await kipam.clusters.plan("eu1-prod", parent="site")
    assert created
    assert cluster.block.name == "eu1-prod"
    assert cluster.block.cidr == parse_prefix("fd3c:9e12:7a00::/48")
    assert sorted(cluster.pools) == ["egress", "ingress", "node", "pod", "service"]
    assert cluster.pools["pod"].name == "eu1-prod/pod"
    assert cluster.pools["pod"].cidr.length == 52
    assert cluster.pools["pod"].policy.default_length == 64
    assert cluster.pools["service"].cidr.length == 112
    assert cluster.pools["egress"].cidr.length == 120
    for pool in cluster.pools.values():
        assert cluster.block.cidr.contains(pool.cidr)
        assert pool.parent == "eu1-prod"
    again, created = await kipam.clusters.plan("eu1-prod", parent="site")
    assert not created
    assert again.block.cidr == cluster.block.cidr
    assert (await kipam.clusters.get("eu1-prod")).pools == again.pools


async def test_dry_run_shows_exactly_what_would_be_taken(kipam: Kipam) -> None:
    """A dry run writes nothing and shows what the real plan then takes."""
    await sites(kipam)
    before = await counts(kipam)
    preview, created = await kipam.clusters.plan("eu1-prod", parent="site", dry_run=True)
    assert created
    assert await counts(kipam) == before
    with pytest.raises(ResourceNotFoundError):
        await kipam.clusters.get("eu1-prod")
    real, _ = await kipam.clusters.plan("eu1-prod", parent="site")
    assert {r: p.cidr for r, p in preview.pools.items()} == {
        r: p.cidr for r, p in real.pools.items()
    }


async def test_plan_with_other_settings_is_a_conflict(kipam: Kipam) -> None:
    """Another plan under a taken name is refused, naming the difference."""
    await sites(kipam)
    await kipam.clusters.plan("eu1-prod", parent="site")
    with pytest.raises(AlreadyExistsError, match="node_prefix_length"):
        await kipam.clusters.plan("eu1-prod", parent="site", overrides={"node_prefix_length": "60"})


async def test_impossible_plans_are_refused_before_anything_is_written(kipam: Kipam) -> None:
    """Every kind of impossible plan is refused and leaves no trace."""
    await sites(kipam)
    before = await counts(kipam)
    with pytest.raises(ClusterCheckError) as caught:
        await kipam.clusters.plan(
            "bad",
            parent="site",
            template="ipv6-cluster-pool",
            overrides={"node_prefix_length": "72"},
        )
    assert [v.rule for v in caught.value.violations] == ["node-mask-diff"]
    assert "20 bits longer" in str(caught.value)
    with pytest.raises(ClusterCheckError) as caught:
        await kipam.clusters.plan("bad", parent="site", overrides={"service_prefix_length": "104"})
    assert [v.rule for v in caught.value.violations] == ["service-range-too-large"]
    with pytest.raises(InvalidRequestError, match="do not fit"):
        await kipam.clusters.plan("bad", parent="site", overrides={"pod_prefix_length": "48"})
    with pytest.raises(InvalidRequestError, match="not a cluster setting"):
        await kipam.clusters.plan("bad", parent="site", overrides={"nodes": "3"})
    with pytest.raises(PolicyViolationError, match="cannot come from"):
        await kipam.clusters.plan("bad", parent="site", overrides={"block_prefix_length": "32"})
    assert await counts(kipam) == before
    # /80 per node from a /56 is fine when kipam slices the pod prefix
    dense, _ = await kipam.clusters.plan("dense", parent="site", template="ipv6-dense")
    assert dense.settings.node_prefix_length == 80
    # A full site pool: exhausted, and again nothing written.
    before = await counts(kipam)
    with pytest.raises(PoolExhaustedError):
        await kipam.clusters.plan("big", parent="site", overrides={"block_prefix_length": "40"})
    assert await counts(kipam) == before


async def test_dual_stack_and_name_checks(kipam: Kipam) -> None:
    """Dual-stack needs an IPv4 site pool; its pools live under <cluster>/ipv4."""
    await sites(kipam, ipv4=True)
    with pytest.raises(InvalidRequestError, match="IPv4 site pool"):
        await kipam.clusters.plan("ds", parent="site", template="dual-stack")
    cluster, _ = await kipam.clusters.plan(
        "ds", parent="site", parent_ipv4="site4", template="dual-stack"
    )
    assert cluster.ipv4_block is not None
    assert cluster.ipv4_block.name == "ds/ipv4"
    assert cluster.ipv4_pools["pod"].name == "ds/ipv4/pod"
    assert [p.version for p in cluster.prefixes("service")] == [6, 4]
    with pytest.raises(InvalidRequestError):
        await kipam.clusters.plan("Bad_Name", parent="site")


async def test_nodes_are_idempotent_and_quarantined(kipam: Kipam) -> None:
    """A node keeps its prefix; racing requests make one; released ones wait."""
    await sites(kipam)
    await kipam.clusters.plan("c1", parent="site")
    first = await kipam.clusters.allocate_node("c1", "worker-1")
    assert [a.prefix.length for a in first] == [64]
    assert await kipam.clusters.allocate_node("c1", "worker-1") == first
    racing = await asyncio.gather(
        *(kipam.clusters.allocate_node("c1", "worker-2") for _ in range(8))
    )
    assert len({a[0].id for a in racing}) == 1
    released = await kipam.clusters.release_node("c1", "worker-1")
    assert [a.state for a in released] == ["quarantined"]
    assert await kipam.clusters.release_node("c1", "worker-1") == []
    again = await kipam.clusters.allocate_node("c1", "worker-1")
    assert again[0].prefix != first[0].prefix  # the old one waits out its quarantine


async def test_egress_is_sticky_and_lookup_names_the_identity(kipam: Kipam) -> None:
    """An identity gets its egress address back; lookup names who held it when."""
    await sites(kipam)
    await kipam.clusters.plan("c1", parent="site")
    billing = EgressIdentity("tenant-a", {"app": "billing"})
    other = EgressIdentity("tenant-a", {"app": "web"})
    first = await kipam.clusters.allocate_egress("c1", billing)
    assert first.prefix.length == 128
    then = dt.datetime.now(dt.UTC)
    assert await kipam.clusters.allocate_egress("c1", billing) == first
    web = await kipam.clusters.allocate_egress("c1", other)
    assert web.prefix != first.prefix
    await kipam.clusters.release_egress("c1", billing)
    back = await kipam.clusters.allocate_egress("c1", billing)
    assert back.prefix == first.prefix
    assert back.id != first.id
    address = str(first.prefix).split("/")[0]
    for at in (then, None):  # who held it then (the first allocation), and now (the second)
        held = await kipam.lookup(address, at=at)
        assert held[0].id == (first.id if at else back.id)
        assert EgressIdentity.of(held[0]) == billing
        assert held[0].owner == "egress/tenant-a/app=billing"


async def test_delete_refuses_while_nodes_hold_prefixes(kipam: Kipam) -> None:
    """Delete is refused while nodes hold prefixes, then forced; history is kept."""
    await sites(kipam)
    cluster, _ = await kipam.clusters.plan("c1", parent="site")
    await kipam.clusters.allocate_node("c1", "worker-1")
    await kipam.clusters.allocate_service("c1", "default", "web")
    with pytest.raises(PreconditionFailedError, match="worker-1"):
        await kipam.clusters.delete("c1")
    await kipam.clusters.delete("c1", force=True, ctx=RequestContext(actor="ops"))
    with pytest.raises(ResourceNotFoundError):
        await kipam.clusters.get("c1")
    history = await kipam.db.fetch("SELECT kind FROM changes WHERE actor = 'ops' ORDER BY revision")
    kinds = [r["kind"] for r in history]
    assert kinds[-1] == "cluster.deleted"
    assert kinds.count("pool.deleted") == 6
    # The block waits out the site pool's quarantine; a new plan takes the next one.
    again, _ = await kipam.clusters.plan("c1", parent="site")
    assert again.block.cidr != cluster.block.cidr


async def test_templates_are_stored_and_checked(kipam: Kipam) -> None:
    """Templates: stored, idempotent, conflicting, listed, used by a plan."""
    await sites(kipam)
    template, created = await kipam.clusters.create_template(
        "small", overrides={"pod_prefix_length": "56"}, description="small clusters"
    )
    assert created
    assert template.settings.pod_prefix_length == 56
    assert (await kipam.clusters.create_template("small", overrides={"pod_prefix_length": "56"}))[
        1
    ] is False
    with pytest.raises(AlreadyExistsError):
        await kipam.clusters.create_template("small", overrides={"pod_prefix_length": "60"})
    names = [t.name for t in await kipam.clusters.list_templates()]
    assert names[:4] == ["ipv6", "ipv6-dense", "ipv6-cluster-pool", "dual-stack"]
    assert "small" in names
    cluster, _ = await kipam.clusters.plan("c1", parent="site", template="small")
    assert cluster.pools["pod"].cidr.length == 56
    with pytest.raises(ResourceNotFoundError):
        await kipam.clusters.plan("c2", parent="site", template="nope")
    await kipam.clusters.delete_template("small")


async def test_role_pools_are_not_deleted_on_their_own(kipam: Kipam) -> None:
    """A cluster's pools go only with the cluster."""
    await sites(kipam)
    await kipam.clusters.plan("c1", parent="site", dry_run=False)
    with pytest.raises(PreconditionFailedError, match="cluster"):
        await kipam.delete_pool("c1/egress")


async def test_concurrent_plans_make_one_cluster_each(kipam: Kipam) -> None:
    """The same plan from many callers is made once; distinct plans get distinct blocks."""
    await sites(kipam)
    same = await asyncio.gather(*(kipam.clusters.plan("c1", parent="site") for _ in range(6)))
    assert sorted(created for _, created in same) == [False] * 5 + [True]
    assert len({cluster.block.cidr for cluster, _ in same}) == 1
    distinct = await asyncio.gather(
        *(kipam.clusters.plan(f"d{i}", parent="site") for i in range(6))
    )
    blocks = {cluster.block.cidr for cluster, _ in distinct} | {same[0][0].block.cidr}
    assert len(blocks) == 7
    pools = await kipam.db.fetchrow("SELECT count(*) AS n FROM pools WHERE deleted_at IS NULL")
    assert pools is not None
    assert pools["n"] == 1 + 7 * 6


async def test_racing_sticky_reclaims_give_one_address(kipam: Kipam) -> None:
    """Callers racing to take back a released egress address share one row and one address."""
    await sites(kipam)
    await kipam.clusters.plan("c1", parent="site")
    billing = EgressIdentity("tenant-a", {"app": "billing"})
    first = await kipam.clusters.allocate_egress("c1", billing)
    await kipam.clusters.release_egress("c1", billing)
    racing = await asyncio.gather(
        *(kipam.clusters.allocate_egress("c1", billing) for _ in range(6))
    )
    assert {a.id for a in racing} == {racing[0].id}
    assert racing[0].prefix == first.prefix
    holders = await kipam.clusters.egress_holders(await kipam.clusters.get("c1"))
    assert holders == [(billing, first.prefix)]


async def test_a_stale_replay_never_answers_a_released_prefix(kipam: Kipam) -> None:
    """A node whose first prefix was released meanwhile gets a new, active one."""
    await sites(kipam)
    cluster, _ = await kipam.clusters.plan("c1", parent="site")
    (first,) = await kipam.clusters.allocate_node("c1", "worker-1")
    await kipam.clusters.release_node("c1", "worker-1")
    clusters = kipam.clusters
    real = clusters._held
    reads = 0

    async def stale(pool: object, owner: str) -> list[object]:
        nonlocal reads
        reads += 1
        return [] if reads == 1 else await real(pool, owner)  # type: ignore[arg-type]

    clusters._held = stale  # type: ignore[method-assign]
    try:
        (again,) = await clusters.allocate_node("c1", "worker-1")
    finally:
        del clusters._held
    assert reads == 2
    assert again.state == "active"
    assert again.prefix != first.prefix
    assert cluster.pools["pod"].cidr.contains(again.prefix)


async def test_cluster_pools_take_no_foreign_children(kipam: Kipam) -> None:
    """Pools under a cluster's block or role pools, or clusters from them, are refused."""
    await sites(kipam)
    await kipam.clusters.plan("c1", parent="site")
    for parent in ("c1", "c1/service"):
        with pytest.raises(PreconditionFailedError, match="belongs to cluster c1"):
            await kipam.create_pool("c1/zz", parent=parent, prefix_length=120, role="pod")
    with pytest.raises(PreconditionFailedError, match="site pool"):
        await kipam.clusters.plan("c2", parent="c1")
    await kipam.clusters.delete("c1")


async def test_identities_cannot_borrow_kubernetes_labels(kipam: Kipam) -> None:
    """The namespace is the identity's own field; Kubernetes's and Cilium's keys are refused."""
    await sites(kipam)
    await kipam.clusters.plan("c1", parent="site")
    for labels in ({"io.kubernetes.pod.namespace": "shop"}, {"io.cilium.k8s.policy.x": "y"}):
        with pytest.raises(InvalidRequestError, match="own"):
            await kipam.clusters.allocate_egress("c1", EgressIdentity("tenant-a", labels))


async def test_contradicting_settings_are_refused(kipam: Kipam) -> None:
    """The egress gateway needs kube-proxy replacement, and IPv4 masquerading on dual-stack."""
    await sites(kipam, ipv4=True)
    with pytest.raises(InvalidRequestError, match="kube_proxy_replacement"):
        await kipam.clusters.plan(
            "c1",
            parent="site",
            overrides={"egress_gateway": "true", "kube_proxy_replacement": "false"},
        )
    with pytest.raises(InvalidRequestError, match="ipv4_masquerade") as caught:
        await kipam.clusters.plan(
            "c1",
            parent="site",
            parent_ipv4="site4",
            template="dual-stack",
            overrides={"ipv4_masquerade": "false"},
        )
    assert caught.value.field == "overrides.ipv4_masquerade"
    with pytest.raises(InvalidRequestError):
        await kipam.clusters.create_template(
            "t", overrides={"kube_proxy_replacement": "no", "egress_gateway": "yes"}
        )


async def test_clusters_list_by_name_in_pages(kipam: Kipam) -> None:
    """Pages of clusters, each with its own pools (read together for the page)."""
    await sites(kipam, ipv4=True)
    await kipam.clusters.plan("b", parent="site")
    await kipam.clusters.plan("a", parent="site", parent_ipv4="site4", template="dual-stack")
    await kipam.clusters.plan("c", parent="site")
    first = await kipam.clusters.list_clusters(limit=2)
    assert [c.name for c in first.items] == ["a", "b"]
    assert first.next_cursor == "b"
    rest = await kipam.clusters.list_clusters(after=first.next_cursor, limit=2)
    assert [c.name for c in rest.items] == ["c"]
    assert rest.next_cursor is None
    for cluster in (*first.items, *rest.items):
        assert cluster == await kipam.clusters.get(cluster.name)
        assert all(p.name.startswith(f"{cluster.name}/") for p in cluster.role_pools())
    assert first.items[0].ipv4_pools["pod"].name == "a/ipv4/pod"
