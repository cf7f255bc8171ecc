"""The ``/v1`` resources: thin handlers that convert, call one use case, convert back.

Pool names contain ``/``: ``/v1/pools/eu1-prod/pod/usage`` is the usage of pool
``eu1-prod/pod`` (:mod:`service.rest.paths` folds the name into one path parameter before
routing, so each sub-resource is a route with its own OpenAPI operation).

Lists page by keyset (``limit``, ``after``) and link the next page in ``next``; lists, lookup
and usage answer an aligned text table for ``?format=text`` or ``Accept: text/plain``.
"""

from __future__ import annotations

import datetime as dt  # noqa: TC003 - Litestar reads the annotations at run time
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote, urlencode

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import (
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
    PathParameter,
    QueryParameter,
)
from litestar.response import Response

from service.errors import InvalidRequestError
from service.models import RequestContext, address_text, to_address
from service.rest import text
from service.rest.guard import principal_of
from service.rest.paths import original_path
from service.rest.problems import PROBLEM_MEDIA_TYPE
from service.rest.schemas import (
    AllocateIn,
    AllocationList,
    AllocationOut,
    BatchOut,
    ChangeList,
    ChangeOut,
    LookupOut,
    PoolIn,
    PoolList,
    PoolOut,
    PrefixList,
    Problem,
    UsageOut,
)
from service.usecases import Kipam

if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = [
    "AllocationController",
    "Limit",
    "PoolController",
    "QueryController",
    "UseCases",
    "context",
    "errors",
    "next_url",
]

Format = Annotated[
    Literal["json", "text"] | None,
    QueryParameter(
        name="format",
        description="`text` for an aligned table (so does `Accept: text/plain`).",
    ),
]
StateFilter = Annotated[
    Literal["active", "quarantined", "released"] | None,
    QueryParameter(name="state", description="Only allocations in this state."),
]
UseCases = NamedDependency[Kipam]
Selector = Annotated[
    str, QueryParameter(description="Kubernetes label selector: `k=v,k2!=v2,k3,!k4`.")
]
Limit = Annotated[int, QueryParameter(ge=1, le=1000, description="Page size (1-1000).")]
After = Annotated[
    str | None, QueryParameter(description="The `after` of the previous page's `next`.")
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="Makes retries safe: the same key answers with what it made the first "
        "time (200 instead of 201).",
        min_length=1,
        max_length=256,
    ),
]
PoolName = Annotated[
    str,
    PathParameter(
        description="The pool's name, e.g. `eu1-prod/pod`; its `/` may be written plain or "
        "as `%2F`.",
    ),
]


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """The problem responses an operation may answer (RFC 9457)."""
    described = {
        404: "No such pool, allocation, cluster or template.",
        409: "A conflict: the name or prefix is taken, the pool is exhausted, or its state "
        "forbids the change.",
        422: "Invalid input; `field` names it (and `violations` each broken cluster rule).",
        401: "No valid API token (missing, unknown, revoked or expired).",
        403: "The token's scope or pool patterns do not allow this.",
        429: "The token is over its request rate; retry after `Retry-After` seconds.",
        503: "The database or a pool lock did not answer in time; retry.",
    }
    return {
        code: ResponseSpec(Problem, description=described[code], media_type=PROBLEM_MEDIA_TYPE)
        for code in (*statuses, 401, 403, 429, 503)
    }


def context(request: Request[Any, Any, Any]) -> RequestContext:
    """Who asks (the guard's principal), and the request's id and trace from its headers."""
    return RequestContext.from_headers(
        request.headers.get("x-request-id"),
        request.headers.get("traceparent"),
        actor=principal_of(request).name,
    )


def _wants_text(request: Request[Any, Any, Any], fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "text"
    accept = request.headers.get("accept", "")
    return "text/plain" in accept and "application/json" not in accept


def next_url(request: Request[Any, Any, Any], cursor: str | None) -> str | None:
    """The URL of the next page: this request's query with ``after`` moved on."""
    if cursor is None:
        return None
    query = {k: v for k, v in request.query_params.items() if k != "after"}
    query["after"] = cursor
    return f"{original_path(request)}?{urlencode(query)}"


def _listing(
    request: Request[Any, Any, Any],
    fmt: str | None,
    body: Any,
    render: Callable[[Any], str],
) -> Response[Any]:
    if _wants_text(request, fmt):
        return Response(render(body), media_type="text/plain; charset=utf-8")
    return Response(body)


def _name(name: str) -> str:
    return unquote(name)


class PoolController(Controller):
    """Pools and what hangs off one: its allocations, usage and free prefixes."""

    path = "/v1/pools"
    tags = ["pools"]  # noqa: RUF012 - Litestar's class attribute

    @post(
        "/",
        operation_id="CreatePool",
        summary="Create a pool",
        description="A root pool (`cidr`) or a child pool carved from `parent` (by "
        "`prefix_length`, or an exact `cidr`). 201 when created; 200 when the "
        "`Idempotency-Key` replays an earlier create.",
        responses={
            200: ResponseSpec(PoolOut, description="An idempotent replay."),
            **errors(404, 409, 422),
        },
    )
    async def create_pool(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        data: JSONBody[PoolIn],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[PoolOut]:
        pool, created = await kipam.create_pool(
            data.name,
            cidr=data.cidr,
            parent=data.parent,
            prefix_length=data.prefix_length,
            role=data.role,
            space=data.space,
            policy=data.policy.to_policy() if data.policy else None,
            labels=data.labels,
            idempotency_key=idempotency_key,
            ctx=context(request),
        )
        return Response(PoolOut.from_model(pool), status_code=201 if created else 200)

    @get(
        "/",
        operation_id="ListPools",
        summary="List pools",
        description="Live pools by name, filtered; `?format=text` for a table.",
        responses=errors(422),
    )
    async def list_pools(  # noqa: PLR0913 - the filters
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        space: FromQuery[str | None] = None,
        role: FromQuery[str | None] = None,
        parent: FromQuery[str | None] = None,
        selector: Selector = "",
        family: FromQuery[int | None] = None,
        limit: Limit = 100,
        after: After = None,
        format: Format = None,  # noqa: A002 - the query parameter's name
    ) -> Response[PoolList]:
        page = await kipam.list_pools(
            space=space,
            role=role,
            parent=parent,
            selector=selector,
            family=family,
            after=after,
            limit=limit,
        )
        body = PoolList(
            items=[PoolOut.from_model(p) for p in page.items],
            next=next_url(request, page.next_cursor),
        )
        return _listing(request, format, body, lambda b: text.pools(b.items))

    @get(
        "/{name:str}",
        operation_id="GetPool",
        summary="Show a pool",
        responses=errors(404, 422),
    )
    async def get_pool(self, kipam: UseCases, name: PoolName) -> PoolOut:
        return PoolOut.from_model(await kipam.get_pool(_name(name)))

    @delete(
        "/{name:str}",
        operation_id="DeletePool",
        summary="Delete a pool",
        description="Refused (409) while it holds prefixes, active or in quarantine.",
        responses=errors(404, 409, 422),
    )
    async def delete_pool(
        self, kipam: UseCases, request: Request[Any, Any, Any], name: PoolName
    ) -> None:
        await kipam.delete_pool(_name(name), ctx=context(request))

    @get(
        "/{name:str}/usage",
        operation_id="GetPoolUsage",
        summary="How full a pool is",
        description="From the in-memory engine (no table scan): counts, percentages, the "
        "largest free block; `length` also counts the free prefixes of that length.",
        responses=errors(404, 422),
    )
    async def usage(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: PoolName,
        length: Annotated[int | None, QueryParameter(ge=0, le=128)] = None,
        format: Format = None,  # noqa: A002
    ) -> Response[UsageOut]:
        body = UsageOut.from_model(await kipam.usage(_name(name), length=length))
        return _listing(request, format, body, text.usage)

    @get(
        "/{name:str}/available",
        operation_id="ListAvailablePrefixes",
        summary="Free prefixes",
        description="The first free prefixes of `length` (default: the pool's), in address order.",
        responses=errors(404, 422),
    )
    async def available(
        self,
        kipam: UseCases,
        name: PoolName,
        length: Annotated[int | None, QueryParameter(ge=0, le=128)] = None,
        limit: Limit = 100,
    ) -> PrefixList:
        found = await kipam.available(_name(name), length=length, limit=limit)
        return PrefixList(items=[str(p) for p in found])

    @post(
        "/{name:str}/allocations",
        operation_id="AllocatePrefix",
        summary="Allocate a prefix (or a batch)",
        description="One prefix by `prefix_length` or exact `prefix`, or a batch in "
        "`requests` (all or nothing, like gRPC AllocatePrefixes). 201 when created; 200 "
        "when an idempotency key replays. A dry run answers what would be taken, id 0.",
        responses={
            200: ResponseSpec(AllocationOut, description="An idempotent replay."),
            **errors(404, 409, 422),
        },
    )
    async def allocate(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: PoolName,
        data: JSONBody[AllocateIn],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[AllocationOut | BatchOut]:
        pool = _name(name)
        if data.requests is not None:
            if data.owner is not None or data.prefix_length is not None or data.prefix:
                raise InvalidRequestError(
                    "Give either requests (a batch) or one request, not both.", field="requests"
                )
            answers = await kipam.allocate_many(
                pool,
                [r.to_request() for r in data.requests],
                dry_run=data.dry_run,
                ctx=context(request),
            )
            batch = BatchOut(items=[AllocationOut.from_model(a) for a, _ in answers])
            created = any(c for _, c in answers)
            return Response(batch, status_code=201 if created else 200)
        allocation, created = await kipam.allocate(
            pool,
            owner=data.owner or "",
            length=data.prefix_length,
            prefix=data.prefix,
            labels=data.labels,
            idempotency_key=idempotency_key,
            dry_run=data.dry_run,
            ctx=context(request),
        )
        return Response(AllocationOut.from_model(allocation), status_code=201 if created else 200)

    @get(
        "/{name:str}/allocations",
        operation_id="ListPoolAllocations",
        summary="A pool's allocations",
        description="Oldest first, filtered; `?format=text` for a table.",
        responses=errors(404, 422),
    )
    async def pool_allocations(  # noqa: PLR0913 - the filters
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        name: PoolName,
        owner: FromQuery[str | None] = None,
        selector: Selector = "",
        state_filter: StateFilter = None,
        family: FromQuery[int | None] = None,
        limit: Limit = 100,
        after: After = None,
        format: Format = None,  # noqa: A002
    ) -> Response[AllocationList]:
        return await _allocation_list(
            kipam,
            request,
            format,
            pool=_name(name),
            owner=owner,
            selector=selector,
            state=state_filter,
            family=family,
            limit=limit,
            after=after,
        )


class AllocationController(Controller):
    """Allocations by id, and across pools."""

    path = "/v1/allocations"
    tags = ["allocations"]  # noqa: RUF012

    @get(
        "/",
        operation_id="ListAllocations",
        summary="List allocations",
        description="Across pools, oldest first, filtered; `?format=text` for a table.",
        responses=errors(404, 422),
    )
    async def list_allocations(  # noqa: PLR0913 - the filters
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        pool: FromQuery[str | None] = None,
        owner: FromQuery[str | None] = None,
        selector: Selector = "",
        state_filter: StateFilter = None,
        family: FromQuery[int | None] = None,
        limit: Limit = 100,
        after: After = None,
        format: Format = None,  # noqa: A002
    ) -> Response[AllocationList]:
        return await _allocation_list(
            kipam,
            request,
            format,
            pool=pool,
            owner=owner,
            selector=selector,
            state=state_filter,
            family=family,
            limit=limit,
            after=after,
        )

    @get(
        "/{allocation_id:int}",
        operation_id="GetAllocation",
        summary="Show an allocation",
        responses=errors(404, 422),
    )
    async def get_allocation(self, kipam: UseCases, allocation_id: FromPath[int]) -> AllocationOut:
        return AllocationOut.from_model(await kipam.get_allocation(allocation_id))

    @delete(
        "/{allocation_id:int}",
        operation_id="ReleasePrefix",
        summary="Release an allocation",
        description="Into quarantine (or released at once if the pool has none); answers the "
        "allocation in its new state. Idempotent.",
        status_code=200,
        responses=errors(404, 409, 422),
    )
    async def release(
        self, kipam: UseCases, request: Request[Any, Any, Any], allocation_id: FromPath[int]
    ) -> AllocationOut:
        return AllocationOut.from_model(await kipam.release(allocation_id, ctx=context(request)))


class QueryController(Controller):
    """Questions across the whole address space: who holds an address, what happened."""

    path = "/v1"
    tags = ["queries"]  # noqa: RUF012

    @get(
        "/lookup/{address:str}",
        operation_id="LookupAddress",
        summary="Who holds an address",
        description="The allocations holding it now, or at `at` (who held it then), "
        "innermost first, each with its pool and the time range it was held.",
        responses=errors(422),
    )
    async def lookup(
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        address: FromPath[str],
        at: Annotated[
            dt.datetime | None, QueryParameter(description="RFC 3339, with a zone.")
        ] = None,
        format: Format = None,  # noqa: A002
    ) -> Response[LookupOut]:
        host = to_address(address)
        found = await kipam.lookup(host, at=at)
        body = LookupOut(
            address=address_text(host),
            at=at,
            allocations=[AllocationOut.from_model(a) for a in found],
        )
        return _listing(request, format, body, lambda b: text.allocations(b.allocations))

    @get(
        "/history",
        operation_id="ListChanges",
        summary="The history",
        description="Changes touching `prefix` (overlapping it) and/or in `pool`, oldest "
        "first, made at or after `since`.",
        responses=errors(422),
    )
    async def history(  # noqa: PLR0913 - the filters
        self,
        kipam: UseCases,
        request: Request[Any, Any, Any],
        prefix: FromQuery[str | None] = None,
        pool: FromQuery[str | None] = None,
        since: FromQuery[dt.datetime | None] = None,
        limit: Limit = 100,
        after: After = None,
        format: Format = None,  # noqa: A002
    ) -> Response[ChangeList]:
        page = await kipam.history(prefix=prefix, pool=pool, since=since, after=after, limit=limit)
        body = ChangeList(
            items=[ChangeOut.from_model(c) for c in page.items],
            next=next_url(request, page.next_cursor),
        )
        return _listing(request, format, body, lambda b: text.changes(b.items))


async def _allocation_list(
    kipam: UseCases,
    request: Request[Any, Any, Any],
    fmt: str | None,
    **filters: Any,
) -> Response[AllocationList]:
    page = await kipam.list_allocations(**filters)
    body = AllocationList(
        items=[AllocationOut.from_model(a) for a in page.items],
        next=next_url(request, page.next_cursor),
    )
    return _listing(request, fmt, body, lambda b: text.allocations(b.items))
