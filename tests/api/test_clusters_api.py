"""ClusterService (gRPC) and /v1/clusters, /v1/templates (REST) against a real server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.clusters import BUILTIN_TEMPLATES, EgressIdentity
from service.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    PreconditionFailedError,
    ResourceNotFoundError,
)
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import cluster_pb2_grpc as cpb_grpc

if TYPE_CHECKING:
    import httpx

    from service.client import KipamClient
    from service.grpc.server import GrpcServer

pytestmark = [pytest.mark.integration, pytest.mark.api]

SITE = "fd3c:9e12::/32"


async def test_plan_show_render_delete_over_grpc(client: KipamClient) -> None:
    """A cluster's whole life through the Python client: dry run, plan, replay, holders, delete."""
    await client.create_pool("site", cidr=SITE)
    preview, created = await client.plan_cluster("eu1-prod", parent="site", dry_run=True)
    assert created
    with pytest.raises(ResourceNotFoundError) as missing:
        await client.get_cluster("eu1-prod")
    assert missing.value.resource_type == "cluster"
    cluster, created = await client.plan_cluster("eu1-prod", parent="site")
    assert created
    assert {r: p.cidr for r, p in cluster.pools.items()} == {
        r: p.cidr for r, p in preview.pools.items()
    }
    assert cluster.block.name == "eu1-prod"
    assert cluster.settings.node_prefix_length == 64
    _, created = await client.plan_cluster("eu1-prod", parent="site")
    assert not created
    with pytest.raises(AlreadyExistsError):
        await client.plan_cluster("eu1-prod", parent="site", overrides={"routing_mode": "tunnel"})
    assert [c.name for c in (await client.list_clusters()).items] == ["eu1-prod"]
    shown = await client.get_cluster("eu1-prod")
    assert shown == cluster
    values = yaml.safe_load(await client.render_cluster("eu1-prod", "cilium-values"))
    assert values["ipv6NativeRoutingCIDR"] == str(cluster.pools["pod"].cidr)
    with pytest.raises(InvalidRequestError) as bad:
        await client.render_cluster("eu1-prod", "helmfile")
    assert bad.value.field == "target"
    nodes = await client.allocate_node("eu1-prod", "worker-1")
    assert nodes == await client.allocate_node("eu1-prod", "worker-1")
    vips = await client.allocate_service("eu1-prod", "default", "web")
    assert [v.prefix.length for v in vips] == [128]
    identity = EgressIdentity("tenant-a", {"app": "billing"})
    egress = await client.allocate_egress("eu1-prod", identity)
    assert egress.owner == identity.owner
    assert [a.id for a in await client.release_egress("eu1-prod", identity)] == [egress.id]
    assert (await client.allocate_egress("eu1-prod", identity)).prefix == egress.prefix
    with pytest.raises(PreconditionFailedError, match="worker-1"):
        await client.delete_cluster("eu1-prod")
    assert [a.id for a in await client.release_node("eu1-prod", "worker-1")] == [nodes[0].id]
    deleted = await client.delete_cluster("eu1-prod")
    assert deleted.name == "eu1-prod"
    with pytest.raises(ResourceNotFoundError):
        await client.get_cluster("eu1-prod")


async def test_broken_rules_come_as_bad_request_details(
    client: KipamClient, server: GrpcServer
) -> None:
    """Each broken rule is a BadRequest field violation; nothing is written."""
    await client.create_pool("site", cidr=SITE)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = cpb_grpc.ClusterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PlanCluster(
                cpb.PlanClusterRequest(
                    name="bad",
                    parent_pool="site",
                    template="ipv6-cluster-pool",
                    overrides={"node_prefix_length": "72", "service_prefix_length": "104"},
                )
            )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    rules = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            rules += [v.description.split(":")[0] for v in request.field_violations]
    assert rules == ["node-mask-diff", "service-range-too-large"]
    assert (await client.list_pools()).items[0].name == "site"
    assert len((await client.list_pools()).items) == 1


async def test_templates_over_grpc(client: KipamClient) -> None:
    """Stored templates: made from a base, listed after the built-in ones, deleted."""
    template, created = await client.create_template(
        "small", base="ipv6-cluster-pool", overrides={"pod_prefix_length": "56"}
    )
    assert created
    assert (template.settings.ipam_mode, template.settings.pod_prefix_length) == (
        "cluster-pool",
        56,
    )
    assert (await client.get_template("small")) == template
    names = [t.name for t in await client.list_templates()]
    assert names == ["ipv6", "ipv6-dense", "ipv6-cluster-pool", "dual-stack", "small"]
    with pytest.raises(InvalidRequestError, match="built-in"):
        await client.create_template("ipv6")
    await client.delete_template("small")
    with pytest.raises(ResourceNotFoundError):
        await client.get_template("small")


async def test_clusters_over_rest(http: httpx.AsyncClient) -> None:
    """A dual-stack cluster through /v1/clusters: plan, render, nodes, VIPs, egress, delete."""
    site = await http.post("/v1/pools", json={"name": "site", "cidr": SITE})
    assert site.status_code == 201, site.text
    site4 = await http.post("/v1/pools", json={"name": "site4", "cidr": "10.0.0.0/8"})
    assert site4.status_code == 201, site4.text
    body = {
        "name": "ds",
        "parent_pool": "site",
        "parent_pool_ipv4": "site4",
        "template": "dual-stack",
    }
    dry = await http.post("/v1/clusters", json={**body, "dry_run": True})
    assert dry.status_code == 200, dry.text
    planned = await http.post("/v1/clusters", json=body)
    assert planned.status_code == 201, planned.text
    cluster = planned.json()
    assert sorted(cluster["pools"]) == ["egress", "ingress", "node", "pod", "service"]
    assert cluster["ipv4_block"] == "10.0.0.0/16"
    assert cluster["ipv4_pools"]["pod"]["name"] == "ds/ipv4/pod"
    assert cluster["node_prefix_length"] == 64
    assert cluster["settings"]["family"] == "dual-stack"
    assert (await http.post("/v1/clusters", json=body)).status_code == 200
    assert (await http.get("/v1/clusters/ds")).json() == cluster
    assert [c["name"] for c in (await http.get("/v1/clusters")).json()["items"]] == ["ds"]
    rendered = await http.get("/v1/clusters/ds/render/kubeadm")
    assert rendered.status_code == 200
    assert rendered.headers["content-type"].startswith("application/yaml")
    kubeadm = yaml.safe_load(rendered.text)
    assert kubeadm["networking"]["podSubnet"] == (
        f"{cluster['pools']['pod']['cidr']},{cluster['ipv4_pools']['pod']['cidr']}"
    )
    node = await http.put("/v1/clusters/ds/nodes/worker-1")
    assert node.status_code == 200, node.text
    assert [a["prefix"].count(":") > 0 for a in node.json()["items"]] == [True, False]
    vip = await http.put("/v1/clusters/ds/services/default/web", params={"ipv4": "true"})
    assert len(vip.json()["items"]) == 2
    egress = await http.post(
        "/v1/clusters/ds/egress", json={"namespace": "tenant-a", "labels": {"app": "billing"}}
    )
    assert egress.status_code == 200, egress.text
    policy = await http.get("/v1/clusters/ds/render/egress-policy")
    assert egress.json()["prefix"].split("/")[0] in policy.text
    released = await http.delete(
        "/v1/clusters/ds/egress/tenant-a", params={"labels": "app=billing"}
    )
    assert [a["state"] for a in released.json()["items"]] == ["quarantined"]
    refused = await http.delete("/v1/clusters/ds")
    assert refused.status_code == 409
    assert "worker-1" in refused.json()["detail"]
    forced = await http.delete("/v1/clusters/ds", params={"force": "true"})
    assert forced.status_code == 200, forced.text
    assert (await http.get("/v1/clusters/ds")).status_code == 404


async def test_rest_refusals_list_each_broken_rule(http: httpx.AsyncClient) -> None:
    """A refused plan is a 422 problem with each broken rule in `violations`."""
    await http.post("/v1/pools", json={"name": "site", "cidr": SITE})
    refused = await http.post(
        "/v1/clusters",
        json={
            "name": "bad",
            "parent_pool": "site",
            "overrides": {"service_prefix_length": "104"},
        },
    )
    assert refused.status_code == 422
    problem = refused.json()
    assert refused.headers["content-type"] == "application/problem+json"
    assert [v["rule"] for v in problem["violations"]] == ["service-range-too-large"]
    assert "/112" in problem["violations"][0]["message"]
    assert "maxCIDRBits" in problem["violations"][0]["reference"]
    unknown = await http.post(
        "/v1/clusters",
        json={"name": "bad", "parent_pool": "site", "overrides": {"colour": "blue"}},
    )
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "overrides.colour"
    assert (await http.get("/v1/clusters")).json()["items"] == []


async def test_templates_over_rest(http: httpx.AsyncClient) -> None:
    """/v1/templates: create, list, show, delete."""
    made = await http.post(
        "/v1/templates", json={"name": "tunnel", "overrides": {"routing_mode": "tunnel"}}
    )
    assert made.status_code == 201, made.text
    assert made.json()["settings"]["routing_mode"] == "tunnel"
    listed = (await http.get("/v1/templates")).json()["items"]
    assert [t["builtin"] for t in listed] == [True, True, True, True, False]
    assert (await http.get("/v1/templates/tunnel")).json() == made.json()
    assert (await http.delete("/v1/templates/tunnel")).status_code == 204
    assert (await http.get("/v1/templates/tunnel")).status_code == 404


MALFORMED_CLUSTER = [
    pytest.param("PlanCluster", cpb.PlanClusterRequest(), id="plan-empty"),
    pytest.param(
        "PlanCluster", cpb.PlanClusterRequest(name="Bad/Name", parent_pool="site"), id="plan-name"
    ),
    pytest.param(
        "PlanCluster",
        cpb.PlanClusterRequest(name="c2", parent_pool="site", overrides={"pods": "1"}),
        id="plan-unknown-setting",
    ),
    pytest.param(
        "PlanCluster",
        cpb.PlanClusterRequest(
            name="c2", parent_pool="site", overrides={"node_prefix_length": "'; DROP TABLE"}
        ),
        id="plan-injection-value",
    ),
    pytest.param(
        "PlanCluster",
        cpb.PlanClusterRequest(name="c2", parent_pool="site", overrides={"family": "dual-stack"}),
        id="plan-dual-without-ipv4",
    ),
    pytest.param(
        "PlanCluster",
        cpb.PlanClusterRequest(name="c2", parent_pool="site", parent_pool_ipv4="site"),
        id="plan-ipv4-parent-on-ipv6-only",
    ),
    pytest.param(
        "PlanCluster",
        cpb.PlanClusterRequest(
            name="c2", parent_pool="site", overrides={"egress_prefix_length": "44"}
        ),
        id="plan-role-larger-than-block",
    ),
    pytest.param("GetCluster", cpb.GetClusterRequest(name="x" * 300), id="get-long-name"),
    pytest.param(
        "RenderCluster", cpb.RenderClusterRequest(name="c1", target="helm"), id="render-target"
    ),
    pytest.param(
        "AllocateNodePrefix",
        cpb.AllocateNodePrefixRequest(cluster="c1", node="Worker_1"),
        id="node-name",
    ),
    pytest.param(
        "AllocateNodePrefix",
        cpb.AllocateNodePrefixRequest(cluster="c1", node="w" * 254),
        id="node-too-long",
    ),
    pytest.param(
        "AllocateServiceAddress",
        cpb.AllocateServiceAddressRequest(
            cluster="c1", namespace="default", service="web", ipv4=True
        ),
        id="vip-ipv4-on-ipv6-only",
    ),
    pytest.param(
        "AllocateServiceAddress",
        cpb.AllocateServiceAddressRequest(cluster="c1", namespace="", service="web"),
        id="vip-no-namespace",
    ),
    pytest.param(
        "AllocateEgressAddress",
        cpb.AllocateEgressAddressRequest(
            cluster="c1", identity=cpb.EgressIdentity(namespace="tenant-a")
        ),
        id="egress-no-labels",
    ),
    pytest.param(
        "AllocateEgressAddress",
        cpb.AllocateEgressAddressRequest(
            cluster="c1",
            identity=cpb.EgressIdentity(namespace="tenant-a", labels={"app": "x" * 64}),
        ),
        id="egress-long-label",
    ),
    pytest.param(
        "CreateTemplate",
        cpb.CreateTemplateRequest(name="t", overrides={"routing_mode": "bgp"}),
        id="template-bad-value",
    ),
    pytest.param(
        "CreateTemplate", cpb.CreateTemplateRequest(name="dual-stack"), id="template-builtin"
    ),
    pytest.param(
        "DeleteTemplate", cpb.DeleteTemplateRequest(name="ipv6"), id="template-delete-builtin"
    ),
]


@pytest.mark.parametrize(("rpc", "request_message"), MALFORMED_CLUSTER)
async def test_malformed_cluster_requests_are_invalid_argument(
    client: KipamClient, server: GrpcServer, rpc: str, request_message: Any
) -> None:
    """A malformed cluster request gets INVALID_ARGUMENT and writes nothing."""
    await client.create_pool("site", cidr=SITE)
    await client.plan_cluster("c1", parent="site")
    before = (await client.list_pools()).items, (await client.list_allocations()).items
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub: Any = cpb_grpc.ClusterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, rpc)(request_message, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    after = (await client.list_pools()).items, (await client.list_allocations()).items
    assert after == before
    assert [t.name for t in await client.list_templates()] == list(BUILTIN_TEMPLATES)
