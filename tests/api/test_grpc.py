"""The gRPC API against a real server and database: the scenario table, then the edges."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service.errors import STATUS, Kind, kind_of
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import allocation_pb2_grpc as apb_grpc
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import cluster_pb2_grpc as cpb_grpc
from service.grpc.gen import pool_pb2 as ppb
from service.grpc.gen import pool_pb2_grpc as ppb_grpc
from service.models import AllocationRequest, PoolPolicy
from tests.api.scenarios import SCENARIO, Step, arguments

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from service.client import KipamClient
    from service.grpc.server import GrpcServer

pytestmark = [pytest.mark.integration, pytest.mark.api]


async def _run(client: KipamClient, step: Step, answers: dict[str, Any]) -> Any:
    args = arguments(step, answers)
    if "policy" in args:
        args["policy"] = PoolPolicy(**args["policy"])
    if step.op == "allocate_many":
        owners, length = args.pop("owners"), args.pop("length")
        args["requests"] = [AllocationRequest(owner=o, length=length) for o in owners]
    if step.op == "watch":
        count = args.pop("count")
        changes = []
        async with (
            asyncio.timeout(10),
            contextlib.aclosing(client.watch(reconnect=False, **args)) as stream,
        ):
            async for change in stream:
                changes.append(change)
                if len(changes) == count:
                    break
        return changes
    if step.op == "delete_pool":
        await client.delete_pool(**args)
        return None
    return await getattr(client, step.op)(**args)


async def test_scenario_table(client: KipamClient) -> None:
    """Every step of the shared scenario answers as the table says, errors by status code."""
    answers: dict[str, Any] = {}
    for step in SCENARIO:
        if step.expect is not None:
            with pytest.raises(Exception) as caught:  # noqa: PT011 - the table names the kind
                await _run(client, step, answers)
            cause = caught.value.__cause__
            assert isinstance(cause, grpc.aio.AioRpcError), f"{step.id}: {caught.value!r}"
            assert cause.code().name == STATUS[step.expect].grpc, f"{step.id}: {cause}"
            assert kind_of(caught.value) is step.expect, step.id
            continue
        answer = await _run(client, step, answers)
        if step.check is not None:
            assert step.check(answer), f"{step.id}: {answer!r}"
        answers[step.id] = answer


@pytest.fixture(name="channel")
async def _channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


async def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


MALFORMED = [
    pytest.param("CreatePool", ppb.CreatePoolRequest(), id="create-empty"),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(name="p", cidr="fd00::/8", role=99),
        id="create-unknown-role",
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(name="p", cidr="fd00::/48", policy=ppb.PoolPolicy(strategy=42)),
        id="create-bad-strategy",
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(
            name="p", cidr="fd00::/48", policy=ppb.PoolPolicy(reserved=["nonsense"])
        ),
        id="create-bad-reserved",
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(
            name="p", cidr="fd00::/48", policy=ppb.PoolPolicy(default_length=2**31 - 1)
        ),
        id="create-absurd-length",
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(
            name="p", cidr="fd00::/48", policy=ppb.PoolPolicy(quarantine_seconds=-5)
        ),
        id="create-negative-quarantine",
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(
            name="p", cidr="fd00::/48", labels={f"k{i}": "v" for i in range(5000)}
        ),
        id="create-huge-labels",
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(name="p", cidr="fd00::/48", labels={"bad key!": "v"}),
        id="create-bad-label",
    ),
    pytest.param(
        "CreatePool", ppb.CreatePoolRequest(name="x" * 300, cidr="fd00::/48"), id="create-long-name"
    ),
    pytest.param(
        "CreatePool", ppb.CreatePoolRequest(name="p", cidr="fe80::1%eth0/64"), id="create-zone-id"
    ),
    pytest.param(
        "CreatePool",
        ppb.CreatePoolRequest(name="p", parent="base", cidr="fd00:1::/56", prefix_length=64),
        id="create-both",
    ),
    pytest.param("GetPool", ppb.GetPoolRequest(), id="get-empty"),
    pytest.param("ListPools", ppb.ListPoolsRequest(family=5), id="list-bad-family"),
    pytest.param("ListPools", ppb.ListPoolsRequest(page_size=-1), id="list-negative-page"),
    pytest.param("ListPools", ppb.ListPoolsRequest(page_size=10**6), id="list-huge-page"),
    pytest.param("ListPools", ppb.ListPoolsRequest(label_selector="!!"), id="list-bad-selector"),
    pytest.param("GetPoolUsage", ppb.GetPoolUsageRequest(name="Bad Name"), id="usage-bad-name"),
    pytest.param("AllocatePrefix", apb.AllocatePrefixRequest(), id="allocate-empty"),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(pool="base", owner="node/a", prefix_length=-7),
        id="allocate-negative-length",
    ),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(pool="base", owner="node/a", prefix_length=2**31 - 1),
        id="allocate-absurd-length",
    ),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(pool="base", owner="node/a", prefix="192.0.2.0/24"),
        id="allocate-wrong-family",
    ),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(pool="base", owner="node/a", prefix="::ffff:10.0.0.0/120"),
        id="allocate-mapped-v4",
    ),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(
            pool="base", owner="node/a", prefix_length=64, labels={f"k{i}": "v" for i in range(65)}
        ),
        id="allocate-too-many-labels",
    ),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(
            pool="base", owner="node/a", prefix_length=64, idempotency_key="k" * 300
        ),
        id="allocate-long-key",
    ),
    pytest.param(
        "AllocatePrefix",
        apb.AllocatePrefixRequest(pool="base", owner="node a", prefix_length=64),
        id="allocate-owner-space",
    ),
    pytest.param("AllocatePrefixes", apb.AllocatePrefixesRequest(pool="base"), id="batch-empty"),
    pytest.param(
        "AllocatePrefixes",
        apb.AllocatePrefixesRequest(
            pool="base", requests=[apb.PrefixRequest(owner="node/a", prefix="garbage")]
        ),
        id="batch-garbage",
    ),
    pytest.param("ReleasePrefix", apb.ReleasePrefixRequest(id=-1), id="release-negative"),
    pytest.param("ListAllocations", apb.ListAllocationsRequest(state=17), id="list-bad-state"),
    pytest.param(
        "ListAllocations",
        apb.ListAllocationsRequest(page_token="abc"),  # noqa: S106
        id="list-bad-token",
    ),
    pytest.param("LookupAddress", apb.LookupAddressRequest(), id="lookup-empty"),
    pytest.param(
        "LookupAddress", apb.LookupAddressRequest(address="2001:db8::/64"), id="lookup-prefix"
    ),
    pytest.param(
        "LookupAddress", apb.LookupAddressRequest(address="fe80::1%eth0"), id="lookup-zone"
    ),
]


@pytest.mark.parametrize(("rpc", "request_message"), MALFORMED)
async def test_malformed_requests_are_invalid_argument(
    client: KipamClient, channel: grpc.aio.Channel, rpc: str, request_message: Any
) -> None:
    """A malformed request gets INVALID_ARGUMENT (never UNKNOWN or INTERNAL) and writes nothing."""
    await client.create_pool("base", cidr="fd00:1::/48", policy=PoolPolicy(default_length=64))
    stub: Any = (
        ppb_grpc.PoolServiceStub(channel)
        if hasattr(ppb_grpc.PoolServiceStub(channel), rpc)
        else apb_grpc.AllocationServiceStub(channel)
    )
    assert await _code(getattr(stub, rpc)(request_message, timeout=10)) is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    pools = await client.list_pools()
    assert [p.name for p in pools.items] == ["base"]
    assert (await client.list_allocations()).items == []


async def test_error_details_name_the_field_and_the_conflict(
    client: KipamClient, channel: grpc.aio.Channel
) -> None:
    """Rich details: BadRequest names the field; ErrorInfo carries the conflicting prefix."""
    await client.create_pool("base", cidr="fd00:1::/48", policy=PoolPolicy(default_length=64))
    stub = apb_grpc.AllocationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AllocatePrefix(apb.AllocatePrefixRequest(pool="base", owner="nobody"))
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert bad.field_violations[0].field == "owner"

    await client.allocate("base", owner="node/a", prefix="fd00:1::/64")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AllocatePrefix(
            apb.AllocatePrefixRequest(pool="base", owner="node/b", prefix="fd00:1::/60")
        )
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    status = rpc_status.from_call(caught.value)
    info = error_details_pb2.ErrorInfo()
    assert status is not None
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    assert (info.reason, info.domain) == ("CONFLICT", "kipam")
    assert info.metadata["conflicts"] == "fd00:1::/64"


async def test_exhausted_names_the_pool_and_largest_free_block(client: KipamClient) -> None:
    """RESOURCE_EXHAUSTED comes back to the client as the engine's error, with its facts."""
    await client.create_pool(
        "tiny", cidr="fd00:2::/120", policy=PoolPolicy(default_length=121, alignment_bits=1)
    )
    await client.allocate("tiny", owner="vip/a")
    await client.allocate("tiny", owner="vip/b", length=122)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the kind is what matters
        await client.allocate("tiny", owner="vip/c")
    error: Any = caught.value
    assert kind_of(error) is Kind.EXHAUSTED
    assert (str(error.pool), error.length, str(error.largest_free)) == (
        "fd00:2::/120",
        121,
        "fd00:2::c0/122",
    )


async def test_cluster_service_names_what_is_missing(channel: grpc.aio.Channel) -> None:
    """A plan from a missing pool, a missing cluster: NOT_FOUND with the resource named."""
    stub = cpb_grpc.ClusterServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PlanCluster(cpb.PlanClusterRequest(name="c", parent_pool="p"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'p'" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetCluster(cpb.GetClusterRequest(name="c"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "There is no cluster named 'c'."


async def test_health_is_serving_for_every_service(channel: grpc.aio.Channel) -> None:
    """grpc.health.v1 answers SERVING overall and for each kipam service."""
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kipam.v1.PoolService", "kipam.v1.AllocationService"):
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_oversized_request_is_refused(channel: grpc.aio.Channel) -> None:
    """A request above the message limit is refused by the transport, nothing written."""
    stub = ppb_grpc.PoolServiceStub(channel)
    huge = ppb.CreatePoolRequest(name="p", cidr="fd00::/48", labels={"k": "v" * (5 * 2**20)})
    assert await _code(stub.CreatePool(huge)) is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_every_answer_carries_its_request_id(
    channel: grpc.aio.Channel, client: KipamClient
) -> None:
    """x-request-id comes back in the trailing metadata: the caller's, or a new one, errors too."""
    await client.create_pool("base", cidr="fd00:1::/48", policy=PoolPolicy(default_length=64))
    stub = apb_grpc.AllocationServiceStub(channel)
    call = stub.AllocatePrefix(
        apb.AllocatePrefixRequest(pool="base", owner="node/a"),
        metadata=(("x-request-id", "job-42"),),
    )
    await call
    assert ("x-request-id", "job-42") in tuple(await call.trailing_metadata())
    changes = await client.history(pool="base")
    assert changes.items[-1].request_id == "job-42"
    failing = stub.GetAllocation(apb.GetAllocationRequest(id=987654321))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await failing
    made = dict(caught.value.trailing_metadata() or ())["x-request-id"]
    assert len(made) == 32
