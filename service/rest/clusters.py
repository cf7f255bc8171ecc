"""REST for clusters and templates: ``/v1/clusters`` and ``/v1/templates``.

The same use cases as gRPC's ClusterService (:mod:`service.cluster_cases`); rendered
configuration is served as ``application/yaml``.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Response

from service.clusters import EgressIdentity
from service.errors import InvalidRequestError
from service.render import TARGETS
from service.rest.routes import Limit, UseCases, context, errors, next_url
from service.rest.schemas import (
    AllocationList,
    AllocationOut,
    ClusterIn,
    ClusterList,
    ClusterOut,
    EgressIn,
    TemplateIn,
    TemplateList,
    TemplateOut,
)

__all__ = ["ClusterController", "TemplateController"]

YAML_MEDIA_TYPE = "application/yaml"
Force = Annotated[
    bool,
    QueryParameter(description="Delete even while nodes still hold pod prefixes."),
]
Ipv4 = Annotated[bool, QueryParameter(description="Also an IPv4 VIP (dual-stack clusters).")]


def _labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` as a map (the identity's pod labels in a query string)."""
    out: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"labels must be k=v[,k=v], not {text!r}.", field="labels")
        out[key.strip()] = value.strip()
    return out


def _allocations(items: list[Any]) -> AllocationList:
    return AllocationList(items=[AllocationOut.from_model(a) for a in items], next=None)


class ClusterController(Controller):
    """Cluster plans, their rendered configuration, and what their controllers hold."""

    path = "/v1/clusters"
    tags = ["clusters"]  # noqa: RUF012 - Litestar's class attribute

    @post(
        "/",
        operation_id="PlanCluster",
        summary="Plan a cluster",
        description="Carves the cluster block from `parent_pool` (and `parent_pool_ipv4` for "
        "dual-stack) and creates its five role pools per family in one transaction, after "
        "checking every Kubernetes and Cilium rule; a refusal lists each broken rule in "
        "`violations`. 201 when planned; 200 when the same plan exists, or for a dry run (which "
        "shows exactly what would be taken).",
        responses={
            200: ResponseSpec(ClusterOut, description="A replay, or a dry run."),
            **errors(404, 409, 422),
        },
    )
    async def plan(
        self, kipam: UseCases, request: Request[Any, Any, Any], data: JSONBody[ClusterIn]
    ) -> Response[ClusterOut]:
        cluster, created = await kipam.clusters.plan(
            data.name,
            parent=data.parent_pool,
            parent_ipv4=data.parent_pool_ipv4,
            template=data.template,
            overrides=data.overrides,
            dry_run=data.dry_run,
            ctx=context(request),
        )
        status = 201 if created and not data.dry_run else 200
        return Response(ClusterOut.from_model(cluster), status_code=status)

    @get("/", operation_id="ListClusters", summary="List clusters", responses=errors(422))
    async def list_clusters(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        limit: Limit = 100,
        after: FromQuery[str | None] = None,
    ) -> ClusterList:
        page = await kipam.clusters.list_clusters(after=after, limit=limit)
        return ClusterList(
            items=[ClusterOut.from_model(c) for c in page.items],
            next=next_url(request, page.next_cursor),
        )

    @get(
        "/{name:str}",
        operation_id="GetCluster",
        summary="Show a cluster",
        responses=errors(404, 422),
    )
    async def get_cluster(self, kipam: UseCases, name: FromPath[str]) -> ClusterOut:
        return ClusterOut.from_model(await kipam.clusters.get(name))

    @delete(
        "/{name:str}",
        operation_id="DeleteCluster",
        summary="Delete a cluster",
        description="Releases everything the cluster holds and deletes its pools; history is "
        "kept, and the blocks return to the site pools through their quarantine. Refused "
        "(409) while nodes hold pod prefixes, unless `force`.",
        status_code=200,
        responses=errors(404, 409, 422),
    )
    async def delete_cluster(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        force: Force = False,
    ) -> ClusterOut:
        cluster = await kipam.clusters.delete(name, force=force, ctx=context(request))
        return ClusterOut.from_model(cluster)

    @get(
        "/{name:str}/render/{target:str}",
        operation_id="RenderCluster",
        summary="Render configuration",
        description=f"The cluster's configuration as YAML, for one of: {', '.join(TARGETS)}.",
        media_type=YAML_MEDIA_TYPE,
        responses=errors(404, 422),
    )
    async def render(
        self, kipam: UseCases, name: FromPath[str], target: FromPath[str]
    ) -> Response[str]:
        content = await kipam.clusters.render(name, target)
        return Response(content, media_type=YAML_MEDIA_TYPE)

    @put(
        "/{name:str}/nodes/{node:str}",
        operation_id="AllocateNodePrefix",
        summary="A node's pod prefixes",
        description="The node's pod prefix per family (IPv6 first, `Node.spec.podCIDRs` "
        "order), allocated on the first call; the same node gets the same prefix until it is "
        "released.",
        status_code=200,
        responses=errors(404, 409, 422),
    )
    async def allocate_node(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        node: FromPath[str],
    ) -> AllocationList:
        held = await kipam.clusters.allocate_node(name, node, ctx=context(request))
        return _allocations(held)

    @delete(
        "/{name:str}/nodes/{node:str}",
        operation_id="ReleaseNodePrefix",
        summary="Release a node's pod prefixes",
        description="Into the pod pool's quarantine; answers what was released now (empty "
        "when the node held nothing).",
        status_code=200,
        responses=errors(404, 422),
    )
    async def release_node(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        node: FromPath[str],
    ) -> AllocationList:
        return _allocations(await kipam.clusters.release_node(name, node, ctx=context(request)))

    @put(
        "/{name:str}/services/{namespace:str}/{service:str}",
        operation_id="AllocateServiceAddress",
        summary="A Service's load-balancer VIPs",
        status_code=200,
        responses=errors(404, 409, 422),
    )
    async def allocate_service(  # noqa: PLR0913 - the path's parts
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        namespace: FromPath[str],
        service: FromPath[str],
        ipv4: Ipv4 = False,
    ) -> AllocationList:
        held = await kipam.clusters.allocate_service(
            name, namespace, service, ipv4=ipv4, ctx=context(request)
        )
        return _allocations(held)

    @delete(
        "/{name:str}/services/{namespace:str}/{service:str}",
        operation_id="ReleaseServiceAddress",
        summary="Release a Service's VIPs",
        status_code=200,
        responses=errors(404, 422),
    )
    async def release_service(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        namespace: FromPath[str],
        service: FromPath[str],
    ) -> AllocationList:
        released = await kipam.clusters.release_service(
            name, namespace, service, ctx=context(request)
        )
        return _allocations(released)

    @post(
        "/{name:str}/egress",
        operation_id="AllocateEgressAddress",
        summary="An identity's egress address",
        description="For an application identity (namespace and pod labels, as Cilium selects "
        "workloads). Sticky: after a release, the same identity gets the same address back "
        "while it is in quarantine.",
        status_code=200,
        responses=errors(404, 409, 422),
    )
    async def allocate_egress(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        data: JSONBody[EgressIn],
    ) -> AllocationOut:
        held = await kipam.clusters.allocate_egress(
            name, EgressIdentity(data.namespace, data.labels), ipv4=data.ipv4, ctx=context(request)
        )
        return AllocationOut.from_model(held)

    @delete(
        "/{name:str}/egress/{namespace:str}",
        operation_id="ReleaseEgressAddress",
        summary="Release an identity's egress addresses",
        status_code=200,
        responses=errors(404, 422),
    )
    async def release_egress(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: FromPath[str],
        namespace: FromPath[str],
        labels: Annotated[str, QueryParameter(description="The pod labels: `k=v[,k=v]`.")],
    ) -> AllocationList:
        identity = EgressIdentity(namespace, _labels(labels))
        return _allocations(
            await kipam.clusters.release_egress(name, identity, ctx=context(request))
        )


class TemplateController(Controller):
    """Cluster templates: the built-in ones and those users store."""

    path = "/v1/templates"
    tags = ["clusters"]  # noqa: RUF012

    @get("/", operation_id="ListTemplates", summary="List templates")
    async def list_templates(self, kipam: UseCases) -> TemplateList:
        templates = await kipam.clusters.list_templates()
        return TemplateList(items=[TemplateOut.from_model(t) for t in templates])

    @post(
        "/",
        operation_id="CreateTemplate",
        summary="Store a template",
        description="`base`'s settings (default `ipv6`) with `overrides`. 201 when stored; "
        "200 when the same template exists.",
        responses={
            200: ResponseSpec(TemplateOut, description="The same template existed."),
            **errors(404, 409, 422),
        },
    )
    async def create_template(
        self, kipam: UseCases, data: JSONBody[TemplateIn]
    ) -> Response[TemplateOut]:
        template, created = await kipam.clusters.create_template(
            data.name, base=data.base, overrides=data.overrides, description=data.description
        )
        return Response(TemplateOut.from_model(template), status_code=201 if created else 200)

    @get(
        "/{name:str}",
        operation_id="GetTemplate",
        summary="Show a template",
        responses=errors(404, 422),
    )
    async def get_template(self, kipam: UseCases, name: FromPath[str]) -> TemplateOut:
        return TemplateOut.from_model(await kipam.clusters.template(name))

    @delete(
        "/{name:str}",
        operation_id="DeleteTemplate",
        summary="Delete a stored template",
        responses=errors(404, 422),
    )
    async def delete_template(self, kipam: UseCases, name: FromPath[str]) -> None:
        await kipam.clusters.delete_template(name)
