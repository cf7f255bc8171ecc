"""The gRPC server: kipam.v1 services, grpc.health.v1, server reflection, graceful stop.

Each servicer method converts its request (:mod:`service.grpc.convert`), calls one use case
and converts the answer; errors are the interceptor's business (:mod:`service.grpc.errors`).

Health: the overall status ("") and each kipam service are SERVING only while the database
answers; a probe task checks every ``probe_s`` seconds. At shutdown every status turns
NOT_SERVING first, so load balancers stop sending calls before the server stops accepting.

Cancellation: grpc cancels a handler whose caller went away or whose deadline passed. A
write queued to a lane is then skipped if it has not started, or runs to its commit (or
rollback) and its answer is dropped: never half-written, and locks are released by the lane.
A retry with the same idempotency key returns what was committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import telemetry
from service.auth import PRINCIPAL
from service.errors import InvalidRequestError, ListenError
from service.grpc import convert
from service.grpc.auth import AuthInterceptor
from service.grpc.errors import REQUEST_ID, ErrorInterceptor
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import allocation_pb2_grpc as apb_grpc
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import cluster_pb2_grpc as cpb_grpc
from service.grpc.gen import pool_pb2 as ppb
from service.grpc.gen import pool_pb2_grpc as ppb_grpc
from service.models import AllocationRequest, RequestContext, address_text, to_address

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from service.app import Resources
    from service.tls import ServerTls
    from service.usecases import Kipam

__all__ = ["GrpcServer", "request_context"]

_log = logging.getLogger("kipam.grpc")

# grpc.aio.ServicerContext; grpcio ships no annotations, so it is Any to mypy either way.
Context: TypeAlias = Any
SERVICES: Final = (
    ppb.DESCRIPTOR.services_by_name["PoolService"].full_name,
    apb.DESCRIPTOR.services_by_name["AllocationService"].full_name,
    cpb.DESCRIPTOR.services_by_name["ClusterService"].full_name,
)
_DEFAULT_PAGE: Final = 100


def request_context(context: Context) -> RequestContext:
    """Who asks, and which request (the interceptor's id) and trace (W3C traceparent) this is."""
    traceparent = next(
        (str(v) for k, v in context.invocation_metadata() or () if k == "traceparent"), None
    )
    return RequestContext.from_headers(
        REQUEST_ID.get() or None, traceparent, actor=PRINCIPAL.get().name
    )


def _page_size(value: int) -> int:
    return value or _DEFAULT_PAGE


class PoolServicer(ppb_grpc.PoolServiceServicer):
    """kipam.v1.PoolService over the use cases."""

    def __init__(self, kipam: Kipam) -> None:
        self.kipam = kipam

    async def CreatePool(
        self, request: ppb.CreatePoolRequest, context: Context
    ) -> ppb.CreatePoolResponse:
        pool, created = await self.kipam.create_pool(
            request.name,
            cidr=request.cidr or None,
            parent=request.parent or None,
            prefix_length=(request.prefix_length if request.HasField("prefix_length") else None),
            role=convert.role_from_pb(request.role) or "container",
            space=request.space or "default",
            policy=convert.policy_from_pb(request.policy),
            labels=dict(request.labels),
            idempotency_key=request.idempotency_key or None,
            ctx=request_context(context),
        )
        return ppb.CreatePoolResponse(pool=convert.pool_pb(pool), created=created)

    async def GetPool(self, request: ppb.GetPoolRequest, context: Context) -> ppb.GetPoolResponse:
        return ppb.GetPoolResponse(pool=convert.pool_pb(await self.kipam.get_pool(request.name)))

    async def ListPools(
        self, request: ppb.ListPoolsRequest, context: Context
    ) -> ppb.ListPoolsResponse:
        page = await self.kipam.list_pools(
            space=request.space or None,
            role=convert.role_from_pb(request.role),
            parent=request.parent or None,
            selector=request.label_selector,
            family=request.family or None,
            after=request.page_token or None,
            limit=_page_size(request.page_size),
        )
        return ppb.ListPoolsResponse(
            pools=[convert.pool_pb(p) for p in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def DeletePool(
        self, request: ppb.DeletePoolRequest, context: Context
    ) -> ppb.DeletePoolResponse:
        await self.kipam.delete_pool(request.name, ctx=request_context(context))
        return ppb.DeletePoolResponse()

    async def GetPoolUsage(
        self, request: ppb.GetPoolUsageRequest, context: Context
    ) -> ppb.GetPoolUsageResponse:
        length = request.length if request.HasField("length") else None
        usage = await self.kipam.usage(request.name, length=length)
        return ppb.GetPoolUsageResponse(usage=convert.usage_pb(usage))

    async def ListAvailablePrefixes(
        self, request: ppb.ListAvailablePrefixesRequest, context: Context
    ) -> ppb.ListAvailablePrefixesResponse:
        prefixes = await self.kipam.available(
            request.name,
            length=request.length if request.HasField("length") else None,
            limit=_page_size(request.limit),
        )
        return ppb.ListAvailablePrefixesResponse(prefixes=[str(p) for p in prefixes])


class AllocationServicer(apb_grpc.AllocationServiceServicer):
    """kipam.v1.AllocationService over the use cases."""

    def __init__(self, kipam: Kipam) -> None:
        self.kipam = kipam

    async def AllocatePrefix(
        self, request: apb.AllocatePrefixRequest, context: Context
    ) -> apb.AllocatePrefixResponse:
        target = request.WhichOneof("target")
        allocation, created = await self.kipam.allocate(
            request.pool,
            owner=request.owner,
            length=request.prefix_length if target == "prefix_length" else None,
            prefix=request.prefix if target == "prefix" else None,
            labels=dict(request.labels),
            idempotency_key=request.idempotency_key or None,
            dry_run=request.dry_run,
            ctx=request_context(context),
        )
        return apb.AllocatePrefixResponse(
            allocation=convert.allocation_pb(allocation), created=created
        )

    async def AllocatePrefixes(
        self, request: apb.AllocatePrefixesRequest, context: Context
    ) -> apb.AllocatePrefixesResponse:
        asked: list[AllocationRequest] = []
        for index, item in enumerate(request.requests):
            try:
                asked.append(convert.allocation_request(item))
            except InvalidRequestError as exc:
                raise InvalidRequestError(
                    f"requests[{index}]: {exc.message}", field=f"requests[{index}].{exc.field}"
                ) from exc
        answers = await self.kipam.allocate_many(
            request.pool, asked, dry_run=request.dry_run, ctx=request_context(context)
        )
        return apb.AllocatePrefixesResponse(
            results=[
                apb.AllocatedPrefix(allocation=convert.allocation_pb(a), created=created)
                for a, created in answers
            ]
        )

    async def ReleasePrefix(
        self, request: apb.ReleasePrefixRequest, context: Context
    ) -> apb.ReleasePrefixResponse:
        allocation = await self.kipam.release(request.id, ctx=request_context(context))
        return apb.ReleasePrefixResponse(allocation=convert.allocation_pb(allocation))

    async def GetAllocation(
        self, request: apb.GetAllocationRequest, context: Context
    ) -> apb.GetAllocationResponse:
        allocation = await self.kipam.get_allocation(request.id)
        return apb.GetAllocationResponse(allocation=convert.allocation_pb(allocation))

    async def ListAllocations(
        self, request: apb.ListAllocationsRequest, context: Context
    ) -> apb.ListAllocationsResponse:
        page = await self.kipam.list_allocations(
            pool=request.pool or None,
            owner=request.owner or None,
            selector=request.label_selector,
            state=convert.state_from_pb(request.state),
            family=request.family or None,
            after=request.page_token or None,
            limit=_page_size(request.page_size),
        )
        return apb.ListAllocationsResponse(
            allocations=[convert.allocation_pb(a) for a in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def LookupAddress(
        self, request: apb.LookupAddressRequest, context: Context
    ) -> apb.LookupAddressResponse:
        at = convert.timestamp_from_pb(request.at, field="at") if request.HasField("at") else None
        host = to_address(request.address)
        found = await self.kipam.lookup(host, at=at)
        return apb.LookupAddressResponse(
            address=address_text(host),
            allocations=[convert.allocation_pb(a) for a in found],
        )

    async def ListChanges(
        self, request: apb.ListChangesRequest, context: Context
    ) -> apb.ListChangesResponse:
        page = await self.kipam.history(
            prefix=request.prefix or None,
            pool=request.pool or None,
            since=(
                convert.timestamp_from_pb(request.since, field="since")
                if request.HasField("since")
                else None
            ),
            after=request.page_token or None,
            limit=_page_size(request.page_size),
        )
        return apb.ListChangesResponse(
            changes=[convert.change_pb(c) for c in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def WatchAllocations(
        self, request: apb.WatchAllocationsRequest, context: Context
    ) -> AsyncIterator[apb.WatchAllocationsResponse]:
        since = request.since_revision if request.HasField("since_revision") else None
        changes = self.kipam.watch(since, request.pool or None)
        try:
            async for change in changes:
                yield apb.WatchAllocationsResponse(change=convert.change_pb(change))
        finally:
            await changes.aclose()


class ClusterServicer(cpb_grpc.ClusterServiceServicer):
    """kipam.v1.ClusterService over the cluster use cases."""

    def __init__(self, kipam: Kipam) -> None:
        self.clusters = kipam.clusters

    async def PlanCluster(
        self, request: cpb.PlanClusterRequest, context: Context
    ) -> cpb.PlanClusterResponse:
        cluster, created = await self.clusters.plan(
            request.name,
            parent=request.parent_pool,
            parent_ipv4=request.parent_pool_ipv4 or None,
            template=request.template or None,
            overrides=dict(request.overrides),
            dry_run=request.dry_run,
            ctx=request_context(context),
        )
        return cpb.PlanClusterResponse(cluster=convert.cluster_pb(cluster), created=created)

    async def GetCluster(
        self, request: cpb.GetClusterRequest, context: Context
    ) -> cpb.GetClusterResponse:
        cluster = await self.clusters.get(request.name)
        return cpb.GetClusterResponse(cluster=convert.cluster_pb(cluster))

    async def ListClusters(
        self, request: cpb.ListClustersRequest, context: Context
    ) -> cpb.ListClustersResponse:
        page = await self.clusters.list_clusters(
            after=request.page_token or None, limit=_page_size(request.page_size)
        )
        return cpb.ListClustersResponse(
            clusters=[convert.cluster_pb(c) for c in page.items],
            next_page_token=page.next_cursor or "",
        )

    async def RenderCluster(
        self, request: cpb.RenderClusterRequest, context: Context
    ) -> cpb.RenderClusterResponse:
        content = await self.clusters.render(request.name, request.target)
        return cpb.RenderClusterResponse(content=content)

    async def DeleteCluster(
        self, request: cpb.DeleteClusterRequest, context: Context
    ) -> cpb.DeleteClusterResponse:
        cluster = await self.clusters.delete(
            request.name, force=request.force, ctx=request_context(context)
        )
        return cpb.DeleteClusterResponse(cluster=convert.cluster_pb(cluster))

    async def AllocateNodePrefix(
        self, request: cpb.AllocateNodePrefixRequest, context: Context
    ) -> cpb.AllocateNodePrefixResponse:
        held = await self.clusters.allocate_node(
            request.cluster, request.node, ctx=request_context(context)
        )
        return cpb.AllocateNodePrefixResponse(allocations=[convert.allocation_pb(a) for a in held])

    async def ReleaseNodePrefix(
        self, request: cpb.ReleaseNodePrefixRequest, context: Context
    ) -> cpb.ReleaseNodePrefixResponse:
        released = await self.clusters.release_node(
            request.cluster, request.node, ctx=request_context(context)
        )
        return cpb.ReleaseNodePrefixResponse(released=[convert.allocation_pb(a) for a in released])

    async def AllocateServiceAddress(
        self, request: cpb.AllocateServiceAddressRequest, context: Context
    ) -> cpb.AllocateServiceAddressResponse:
        held = await self.clusters.allocate_service(
            request.cluster,
            request.namespace,
            request.service,
            ipv4=request.ipv4,
            ctx=request_context(context),
        )
        return cpb.AllocateServiceAddressResponse(
            allocations=[convert.allocation_pb(a) for a in held]
        )

    async def ReleaseServiceAddress(
        self, request: cpb.ReleaseServiceAddressRequest, context: Context
    ) -> cpb.ReleaseServiceAddressResponse:
        released = await self.clusters.release_service(
            request.cluster, request.namespace, request.service, ctx=request_context(context)
        )
        return cpb.ReleaseServiceAddressResponse(
            released=[convert.allocation_pb(a) for a in released]
        )

    async def AllocateEgressAddress(
        self, request: cpb.AllocateEgressAddressRequest, context: Context
    ) -> cpb.AllocateEgressAddressResponse:
        held = await self.clusters.allocate_egress(
            request.cluster,
            convert.identity_from_pb(request.identity),
            ipv4=request.ipv4,
            ctx=request_context(context),
        )
        return cpb.AllocateEgressAddressResponse(allocation=convert.allocation_pb(held))

    async def ReleaseEgressAddress(
        self, request: cpb.ReleaseEgressAddressRequest, context: Context
    ) -> cpb.ReleaseEgressAddressResponse:
        released = await self.clusters.release_egress(
            request.cluster,
            convert.identity_from_pb(request.identity),
            ctx=request_context(context),
        )
        return cpb.ReleaseEgressAddressResponse(
            released=[convert.allocation_pb(a) for a in released]
        )

    async def CreateTemplate(
        self, request: cpb.CreateTemplateRequest, context: Context
    ) -> cpb.CreateTemplateResponse:
        template, created = await self.clusters.create_template(
            request.name,
            base=request.base or None,
            overrides=dict(request.overrides),
            description=request.description,
        )
        return cpb.CreateTemplateResponse(template=convert.template_pb(template), created=created)

    async def GetTemplate(
        self, request: cpb.GetTemplateRequest, context: Context
    ) -> cpb.GetTemplateResponse:
        template = await self.clusters.template(request.name or None)
        return cpb.GetTemplateResponse(template=convert.template_pb(template))

    async def ListTemplates(
        self, request: cpb.ListTemplatesRequest, context: Context
    ) -> cpb.ListTemplatesResponse:
        templates = await self.clusters.list_templates()
        return cpb.ListTemplatesResponse(templates=[convert.template_pb(t) for t in templates])

    async def DeleteTemplate(
        self, request: cpb.DeleteTemplateRequest, context: Context
    ) -> cpb.DeleteTemplateResponse:
        await self.clusters.delete_template(request.name)
        return cpb.DeleteTemplateResponse()


class GrpcServer:
    """kipam's gRPC server over opened resources: start, then stop with a grace period.

    Args:
        res: The process's resources.
        address: ``host:port`` to listen on (port 0: any free port, see :attr:`port`).
        probe_s: How often the health status is refreshed from the database.
    """

    def __init__(self, res: Resources, address: str, *, probe_s: float = 2.0) -> None:
        settings = res.settings
        self.res = res
        self.address = address
        self._probe_s = probe_s
        self.server = grpc.aio.server(
            interceptors=[
                *telemetry.server_interceptors(),
                ErrorInterceptor(),
                AuthInterceptor(res.auth, res.kipam),
            ],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        ppb_grpc.add_PoolServiceServicer_to_server(PoolServicer(res.kipam), self.server)
        apb_grpc.add_AllocationServiceServicer_to_server(AllocationServicer(res.kipam), self.server)
        cpb_grpc.add_ClusterServiceServicer_to_server(ClusterServicer(res.kipam), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self._probe: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None

    async def start(self, tls: ServerTls | None = None) -> None:
        """Bind and start serving; health follows the database from now on.

        Args:
            tls: Serve over TLS with this (reloading) certificate, and require client
                certificates when it has a client CA; None: plaintext.

        Raises:
            ListenError: the address cannot be bound.
        """
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(self.address)
            else:
                self.port = self.server.add_secure_port(self.address, tls.grpc_credentials)
        except RuntimeError as exc:
            raise ListenError(
                f"Cannot listen for gRPC on {self.address} (KIPAM_GRPC_ADDR): the port is taken "
                "or the address is not one of this host's."
            ) from exc
        await self.server.start()
        await self._set_health(up=await self.res.db.ping())
        self._probe = asyncio.create_task(self._watch_database(), name="kipam-grpc-health")

    async def _set_health(self, *, up: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if up
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        up = True
        while True:
            await asyncio.sleep(self._probe_s)
            now = await self.res.db.ping()
            if now != up:
                _log.warning(
                    "database %s: gRPC health %s",
                    *(("answers again", "SERVING") if now else ("does not answer", "NOT_SERVING")),
                )
                up = now
            await self._set_health(up=now)

    async def stop(self, grace_s: float) -> None:
        """Stop: health NOT_SERVING, end the change feeds, then let calls finish.

        New calls are refused at once; calls in flight get ``grace_s`` seconds, then are
        cancelled (their writes are all or nothing, see the module docstring). Calling it
        again waits for the first stop.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await self._stopping

    async def _stop(self, grace_s: float) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.health.enter_graceful_shutdown()
        self.res.kipam.feed.close()
        await self.server.stop(grace_s)
