"""A small typed asyncio client for kipam's gRPC API: what the CLI and controllers use.

::

    async with KipamClient("127.0.0.1:50051") as kipam:
        pool = await kipam.create_pool("eu1", cidr="2001:db8::/32")
        allocation, created = await kipam.allocate(
            "eu1", owner="node/worker-7", length=64, idempotency_key="worker-7"
        )
        async for change in kipam.watch(since_revision=0):
            ...

Answers are the service's own values (:mod:`service.models`); failures are the service's
own errors (:mod:`service.errors`), rebuilt from the status and its ``google.rpc`` details,
so ``kind_of(error)`` is the same on both sides of the wire. Every call has a deadline
(``timeout``); :meth:`KipamClient.watch` resumes after a broken connection from the last
revision it delivered, so a controller sees every change exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final, Self

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine import parse_prefix
from engine.errors import PoolExhaustedError
from service import telemetry
from service.errors import (
    AllocationNotFoundError,
    AlreadyExistsError,
    InternalError,
    InvalidRequestError,
    Kind,
    PermissionDeniedError,
    PoolNotFoundError,
    PreconditionFailedError,
    RateLimitedError,
    ResourceNotFoundError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from service.grpc import convert
from service.grpc.errors import DOMAIN
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import allocation_pb2_grpc as apb_grpc
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import cluster_pb2_grpc as cpb_grpc
from service.grpc.gen import pool_pb2 as ppb
from service.grpc.gen import pool_pb2_grpc as ppb_grpc
from service.models import (
    Allocation,
    AllocationRequest,
    Change,
    Page,
    Pool,
    PoolPolicy,
    PoolUsage,
)

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from engine import Prefix
    from service.clusters import Cluster, EgressIdentity, Template

__all__ = ["DEFAULT_SERVER", "KipamClient", "error_from_rpc"]

_log = logging.getLogger("kipam.client")

DEFAULT_SERVER: Final = "127.0.0.1:50051"
_RETRY_DELAYS_S: Final = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def error_from_rpc(error: grpc.aio.AioRpcError) -> Exception:
    """The service error a failed call stands for, rebuilt from its status details."""
    code = error.code()
    message = error.details() or code.name
    info = error_details_pb2.ErrorInfo()
    resource: error_details_pb2.ResourceInfo | None = None
    retry = error_details_pb2.RetryInfo()
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
        elif detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
    if info.domain == DOMAIN and info.reason == Kind.RATE_LIMITED.name:
        wait = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        return RateLimitedError(message, retry_after_s=wait or 1.0)
    found = _with_details(code, message, info, resource)
    if found is not None:
        return found
    if code in _PLAIN:
        return _PLAIN[code](message)
    if code in _TRANSIENT:
        return ServerUnavailableError(f"{code.name}: {message}")
    return InternalError(f"{code.name}: {message}")


_PLAIN: Final[dict[grpc.StatusCode, Callable[[str], Exception]]] = {
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}
_TRANSIENT: Final = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # without kipam's details: a transport limit
    grpc.StatusCode.CANCELLED,
}


def _with_details(  # noqa: PLR0911 - one answer per status code
    code: grpc.StatusCode,
    message: str,
    info: error_details_pb2.ErrorInfo,
    resource: error_details_pb2.ResourceInfo | None,
) -> Exception | None:
    """The errors whose details carry facts: the field, the resource, the pool, conflicts."""
    md = info.metadata if info.domain == DOMAIN else {}
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message, field=md.get("field"))
    if code is grpc.StatusCode.NOT_FOUND and resource is not None:
        if resource.resource_type == "allocation" and resource.resource_name.isdigit():
            return AllocationNotFoundError(int(resource.resource_name))
        if resource.resource_type != "pool":
            return ResourceNotFoundError(resource.resource_type, resource.resource_name)
        return PoolNotFoundError(resource.resource_name)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "pool" in md:
        largest = md.get("largest_free")
        return PoolExhaustedError(
            message,
            pool=parse_prefix(md["pool"]),
            length=int(md["length"]),
            largest_free=parse_prefix(largest) if largest else None,
        )
    if code is grpc.StatusCode.ALREADY_EXISTS:
        conflicts = md.get("conflicts")
        return AlreadyExistsError(
            message, conflicts=tuple(conflicts.split(",")) if conflicts else ()
        )
    return None


async def _call(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc


class KipamClient:
    """A connection to one kipam server (or a load-balanced address of several).

    Args:
        server: ``host:port`` of the gRPC API (IPv6 hosts in brackets).
        timeout: Deadline of each call, in seconds.
        metadata: Sent with every call (``x-request-id``...).
        credentials: Connect over TLS with these (:func:`service.tls.client_credentials`:
            the CA to trust, and a client certificate where the server requires one);
            None: plaintext.
        token: A bearer token, sent with every call as ``authorization: Bearer ...``.
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        timeout: float = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.server = server
        self.timeout = timeout
        self.metadata = tuple(metadata)
        if token:
            self.metadata = (*self.metadata, ("authorization", f"Bearer {token}"))
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._channel = (
            grpc.aio.insecure_channel(server, options=options)
            if credentials is None
            else grpc.aio.secure_channel(server, credentials, options=options)
        )
        self._pools = ppb_grpc.PoolServiceStub(self._channel)
        self._allocations = apb_grpc.AllocationServiceStub(self._channel)
        self._clusters = cpb_grpc.ClusterServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    def _opts(self) -> dict[str, Any]:
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)  # the caller's trace continues in the server (traceparent)
        if not carrier:
            return {"timeout": self.timeout, "metadata": self.metadata}
        return {"timeout": self.timeout, "metadata": (*self.metadata, *carrier.items())}

    # -- pools ----------------------------------------------------------------------------------

    async def create_pool(  # noqa: PLR0913 - the pool's fields
        self,
        name: str,
        *,
        cidr: str | Prefix | None = None,
        parent: str | None = None,
        prefix_length: int | None = None,
        role: str = "container",
        space: str = "",
        policy: PoolPolicy | None = None,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[Pool, bool]:
        """Create a root pool (``cidr``) or a child pool of ``parent``.

        Returns:
            The pool and whether it was created now (False: an idempotent replay).
        """
        request = ppb.CreatePoolRequest(
            name=name,
            cidr=str(cidr) if cidr is not None else "",
            parent=parent or "",
            role=convert.role_pb(role),
            space=space,
            policy=convert.policy_pb(policy or PoolPolicy()),
            labels=labels or {},
            idempotency_key=idempotency_key or "",
        )
        if prefix_length is not None:
            request.prefix_length = prefix_length
        answer = await _call(self._pools.CreatePool(request, **self._opts()))
        return convert.pool_from_pb(answer.pool), answer.created

    async def get_pool(self, name: str) -> Pool:
        """One pool by name."""
        answer = await _call(self._pools.GetPool(ppb.GetPoolRequest(name=name), **self._opts()))
        return convert.pool_from_pb(answer.pool)

    async def list_pools(  # noqa: PLR0913 - the filters
        self,
        *,
        space: str = "",
        role: str | None = None,
        parent: str = "",
        selector: str = "",
        family: int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[Pool]:
        """One page of pools by name; pass ``next_cursor`` as ``page_token`` for the next."""
        request = ppb.ListPoolsRequest(
            space=space,
            role=convert.role_pb(role) if role else ppb.POOL_ROLE_UNSPECIFIED,
            parent=parent,
            label_selector=selector,
            family=family,
            page_size=page_size,
            page_token=page_token,
        )
        answer = await _call(self._pools.ListPools(request, **self._opts()))
        return Page([convert.pool_from_pb(p) for p in answer.pools], answer.next_page_token or None)

    async def delete_pool(self, name: str) -> None:
        """Delete a pool that holds nothing."""
        await _call(self._pools.DeletePool(ppb.DeletePoolRequest(name=name), **self._opts()))

    async def usage(self, name: str, *, length: int | None = None) -> PoolUsage:
        """How full a pool is."""
        request = ppb.GetPoolUsageRequest(name=name)
        if length is not None:
            request.length = length
        answer = await _call(self._pools.GetPoolUsage(request, **self._opts()))
        return convert.usage_from_pb(answer.usage)

    async def available(
        self, name: str, *, length: int | None = None, limit: int = 0
    ) -> list[Prefix]:
        """The first free prefixes of ``length`` in address order."""
        request = ppb.ListAvailablePrefixesRequest(name=name, limit=limit)
        if length is not None:
            request.length = length
        answer = await _call(self._pools.ListAvailablePrefixes(request, **self._opts()))
        return [parse_prefix(p) for p in answer.prefixes]

    # -- allocations ----------------------------------------------------------------------------

    async def allocate(  # noqa: PLR0913 - the request's fields
        self,
        pool: str,
        *,
        owner: str,
        length: int | None = None,
        prefix: str | Prefix | None = None,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> tuple[Allocation, bool]:
        """Allocate one prefix; returns it and whether it was created now (False: a replay)."""
        request = apb.AllocatePrefixRequest(
            pool=pool,
            owner=owner,
            labels=labels or {},
            idempotency_key=idempotency_key or "",
            dry_run=dry_run,
        )
        if length is not None:
            request.prefix_length = length
        if prefix is not None:
            request.prefix = str(prefix)
        answer = await _call(self._allocations.AllocatePrefix(request, **self._opts()))
        return convert.allocation_from_pb(answer.allocation), answer.created

    async def allocate_many(
        self, pool: str, requests: Sequence[AllocationRequest], *, dry_run: bool = False
    ) -> list[tuple[Allocation, bool]]:
        """Allocate several prefixes from one pool, all or nothing."""
        items = []
        for r in requests:
            item = apb.PrefixRequest(
                owner=r.owner, labels=r.labels, idempotency_key=r.idempotency_key or ""
            )
            if r.length is not None:
                item.prefix_length = r.length
            if r.prefix is not None:
                item.prefix = str(r.prefix)
            items.append(item)
        request = apb.AllocatePrefixesRequest(pool=pool, requests=items, dry_run=dry_run)
        answer = await _call(self._allocations.AllocatePrefixes(request, **self._opts()))
        return [(convert.allocation_from_pb(r.allocation), r.created) for r in answer.results]

    async def release(self, allocation_id: int) -> Allocation:
        """Release an allocation; returns it in its new state."""
        request = apb.ReleasePrefixRequest(id=allocation_id)
        answer = await _call(self._allocations.ReleasePrefix(request, **self._opts()))
        return convert.allocation_from_pb(answer.allocation)

    async def get_allocation(self, allocation_id: int) -> Allocation:
        """One allocation, in any state."""
        request = apb.GetAllocationRequest(id=allocation_id)
        answer = await _call(self._allocations.GetAllocation(request, **self._opts()))
        return convert.allocation_from_pb(answer.allocation)

    async def list_allocations(  # noqa: PLR0913 - the filters
        self,
        *,
        pool: str = "",
        owner: str = "",
        selector: str = "",
        state: str | None = None,
        family: int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[Allocation]:
        """One page of allocations, oldest first."""
        request = apb.ListAllocationsRequest(
            pool=pool,
            owner=owner,
            label_selector=selector,
            state=convert.state_pb(state) if state else apb.ALLOCATION_STATE_UNSPECIFIED,
            family=family,
            page_size=page_size,
            page_token=page_token,
        )
        answer = await _call(self._allocations.ListAllocations(request, **self._opts()))
        return Page(
            [convert.allocation_from_pb(a) for a in answer.allocations],
            answer.next_page_token or None,
        )

    async def lookup(self, address: str, *, at: dt.datetime | None = None) -> list[Allocation]:
        """Allocations holding ``address`` now (or at ``at``), innermost first."""
        request = apb.LookupAddressRequest(address=address)
        if at is not None:
            request.at.FromDatetime(at)
        answer = await _call(self._allocations.LookupAddress(request, **self._opts()))
        return [convert.allocation_from_pb(a) for a in answer.allocations]

    # -- clusters -------------------------------------------------------------------------------

    async def plan_cluster(  # noqa: PLR0913 - the plan's fields
        self,
        name: str,
        *,
        parent: str,
        parent_ipv4: str | None = None,
        template: str | None = None,
        overrides: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> tuple[Cluster, bool]:
        """Plan a cluster; returns it and whether it was planned now."""
        request = cpb.PlanClusterRequest(
            name=name,
            parent_pool=parent,
            parent_pool_ipv4=parent_ipv4 or "",
            template=template or "",
            overrides=dict(overrides or {}),
            dry_run=dry_run,
        )
        answer = await _call(self._clusters.PlanCluster(request, **self._opts()))
        return convert.cluster_from_pb(answer.cluster), answer.created

    async def get_cluster(self, name: str) -> Cluster:
        """One cluster by name."""
        request = cpb.GetClusterRequest(name=name)
        answer = await _call(self._clusters.GetCluster(request, **self._opts()))
        return convert.cluster_from_pb(answer.cluster)

    async def list_clusters(self, *, page_size: int = 0, page_token: str = "") -> Page[Cluster]:
        """One page of clusters by name."""
        request = cpb.ListClustersRequest(page_size=page_size, page_token=page_token)
        answer = await _call(self._clusters.ListClusters(request, **self._opts()))
        return Page(
            [convert.cluster_from_pb(c) for c in answer.clusters], answer.next_page_token or None
        )

    async def render_cluster(self, name: str, target: str) -> str:
        """A cluster's configuration for one target, as YAML."""
        request = cpb.RenderClusterRequest(name=name, target=target)
        answer = await _call(self._clusters.RenderCluster(request, **self._opts()))
        return str(answer.content)

    async def delete_cluster(self, name: str, *, force: bool = False) -> Cluster:
        """Release everything a cluster holds; returns the cluster as it was."""
        request = cpb.DeleteClusterRequest(name=name, force=force)
        answer = await _call(self._clusters.DeleteCluster(request, **self._opts()))
        return convert.cluster_from_pb(answer.cluster)

    async def allocate_node(self, cluster: str, node: str) -> list[Allocation]:
        """The node's pod prefixes (IPv6 first), allocated on first call."""
        request = cpb.AllocateNodePrefixRequest(cluster=cluster, node=node)
        answer = await _call(self._clusters.AllocateNodePrefix(request, **self._opts()))
        return [convert.allocation_from_pb(a) for a in answer.allocations]

    async def release_node(self, cluster: str, node: str) -> list[Allocation]:
        """Release the node's pod prefixes; what was released now."""
        request = cpb.ReleaseNodePrefixRequest(cluster=cluster, node=node)
        answer = await _call(self._clusters.ReleaseNodePrefix(request, **self._opts()))
        return [convert.allocation_from_pb(a) for a in answer.released]

    async def allocate_service(
        self, cluster: str, namespace: str, service: str, *, ipv4: bool = False
    ) -> list[Allocation]:
        """A Service's VIPs (IPv6 first), allocated on first call."""
        request = cpb.AllocateServiceAddressRequest(
            cluster=cluster, namespace=namespace, service=service, ipv4=ipv4
        )
        answer = await _call(self._clusters.AllocateServiceAddress(request, **self._opts()))
        return [convert.allocation_from_pb(a) for a in answer.allocations]

    async def release_service(self, cluster: str, namespace: str, service: str) -> list[Allocation]:
        """Release a Service's VIPs."""
        request = cpb.ReleaseServiceAddressRequest(
            cluster=cluster, namespace=namespace, service=service
        )
        answer = await _call(self._clusters.ReleaseServiceAddress(request, **self._opts()))
        return [convert.allocation_from_pb(a) for a in answer.released]

    async def allocate_egress(
        self, cluster: str, identity: EgressIdentity, *, ipv4: bool = False
    ) -> Allocation:
        """An identity's egress address (sticky through quarantine)."""
        request = cpb.AllocateEgressAddressRequest(
            cluster=cluster, identity=convert.identity_pb(identity), ipv4=ipv4
        )
        answer = await _call(self._clusters.AllocateEgressAddress(request, **self._opts()))
        return convert.allocation_from_pb(answer.allocation)

    async def release_egress(self, cluster: str, identity: EgressIdentity) -> list[Allocation]:
        """Release an identity's egress addresses."""
        request = cpb.ReleaseEgressAddressRequest(
            cluster=cluster, identity=convert.identity_pb(identity)
        )
        answer = await _call(self._clusters.ReleaseEgressAddress(request, **self._opts()))
        return [convert.allocation_from_pb(a) for a in answer.released]

    async def create_template(
        self,
        name: str,
        *,
        base: str | None = None,
        overrides: Mapping[str, str] | None = None,
        description: str = "",
    ) -> tuple[Template, bool]:
        """Store a template; returns it and whether it was created now."""
        request = cpb.CreateTemplateRequest(
            name=name, base=base or "", overrides=dict(overrides or {}), description=description
        )
        answer = await _call(self._clusters.CreateTemplate(request, **self._opts()))
        return convert.template_from_pb(answer.template), answer.created

    async def get_template(self, name: str) -> Template:
        """One template by name."""
        request = cpb.GetTemplateRequest(name=name)
        answer = await _call(self._clusters.GetTemplate(request, **self._opts()))
        return convert.template_from_pb(answer.template)

    async def list_templates(self) -> list[Template]:
        """Built-in templates, then stored ones."""
        answer = await _call(
            self._clusters.ListTemplates(cpb.ListTemplatesRequest(), **self._opts())
        )
        return [convert.template_from_pb(t) for t in answer.templates]

    async def delete_template(self, name: str) -> None:
        """Delete a stored template."""
        request = cpb.DeleteTemplateRequest(name=name)
        await _call(self._clusters.DeleteTemplate(request, **self._opts()))

    async def history(
        self,
        *,
        prefix: str = "",
        pool: str = "",
        since: dt.datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[Change]:
        """One page of the changes touching ``prefix`` and/or in ``pool``, oldest first."""
        request = apb.ListChangesRequest(
            prefix=prefix, pool=pool, page_size=page_size, page_token=page_token
        )
        if since is not None:
            request.since.FromDatetime(since)
        answer = await _call(self._allocations.ListChanges(request, **self._opts()))
        return Page(
            [convert.change_from_pb(c) for c in answer.changes], answer.next_page_token or None
        )

    async def watch(
        self, *, since_revision: int | None = None, pool: str = "", reconnect: bool = True
    ) -> AsyncIterator[Change]:
        """Every change after ``since_revision`` (0: all; None: from now), then live.

        With ``reconnect``, a broken stream (server restart, another replica behind the
        load balancer) is resumed from the last change delivered, with growing pauses; the
        caller sees no gap and no duplicate. (A watch "from now" that breaks before its first
        change resumes from the new now: pass a revision to be exact.) Other errors are
        raised as the service's errors.
        """
        attempt = 0
        while True:
            request = apb.WatchAllocationsRequest(pool=pool)
            if since_revision is not None:
                request.since_revision = since_revision
            call = self._allocations.WatchAllocations(request, metadata=self.metadata)
            try:
                async for message in call:
                    attempt = 0
                    change = convert.change_from_pb(message.change)
                    since_revision = change.revision
                    yield change
                if not reconnect:
                    return
                error: Exception = ServerUnavailableError("the server ended the stream")
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc)
                if not (reconnect and isinstance(error, ServerUnavailableError)):
                    raise error from exc
            finally:
                with contextlib.suppress(Exception):
                    call.cancel()
            delay = _RETRY_DELAYS_S[min(attempt, len(_RETRY_DELAYS_S) - 1)]
            attempt += 1
            _log.info("watch interrupted (%s); resuming in %.1f s", error, delay)
            await asyncio.sleep(delay)
