"""GET /metrics after a known workload through gRPC and REST: what was done, as counted."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from service.errors import Kind, kind_of
from service.models import PoolPolicy
from tests.api.conftest import until

if TYPE_CHECKING:
    import httpx

    from service.client import KipamClient
    from service.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.api]

POLICY = PoolPolicy(default_length=64, quarantine_seconds=0)
REST_POLICY = {"default_length": 64, "quarantine_seconds": 0}
TOTAL = "kipam_operations_total"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    """Every sample /metrics answers now, by name and sorted labels."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v for (n, found), v in samples.items() if n == name and set(labels.items()) <= set(found)
    )


async def workload(client: KipamClient, http: httpx.AsyncClient) -> None:
    """Three pools; allocations and releases over both APIs; one pool filled up and past.

    Afterwards: ``m/grpc`` holds 3 of 16 /64s (5 allocated, 2 released over gRPC),
    ``m/rest`` holds 2 of 4 (3 allocated, 1 released over REST), ``m/full`` holds 2 of 2 and
    refused one more over each API; one allocation named a pool that does not exist.
    """
    await client.create_pool("m/grpc", cidr="fd00:1::/60", policy=POLICY)
    await client.create_pool("m/full", cidr="fd00:3::/63", policy=POLICY)
    created = await http.post(
        "/v1/pools", json={"name": "m/rest", "cidr": "fd00:2::/62", "policy": REST_POLICY}
    )
    assert created.status_code == 201
    held = [(await client.allocate("m/grpc", owner=f"node/g{i}"))[0] for i in range(5)]
    for allocation in held[:2]:
        await client.release(allocation.id)
    ids = []
    for i in range(3):
        answer = await http.post("/v1/pools/m/rest/allocations", json={"owner": f"node/r{i}"})
        assert answer.status_code == 201
        ids.append(answer.json()["id"])
    assert (await http.delete(f"/v1/allocations/{ids[0]}")).status_code == 200
    await client.allocate("m/full", owner="node/f0")
    assert (
        await http.post("/v1/pools/m/full/allocations", json={"owner": "node/f1"})
    ).status_code == 201
    with pytest.raises(Exception) as refused:  # noqa: PT011 - the kind is checked below
        await client.allocate("m/full", owner="node/f2")
    assert kind_of(refused.value) is Kind.EXHAUSTED
    over = await http.post("/v1/pools/m/full/allocations", json={"owner": "node/f3"})
    assert over.status_code == 409
    with pytest.raises(Exception) as missing:  # noqa: PT011
        await client.allocate("m/nowhere", owner="node/x")
    assert kind_of(missing.value) is Kind.NOT_FOUND
    assert [a.prefix for a in await client.lookup("fd00:1:0:2::1")] == [held[2].prefix]
    found = await http.get("/v1/lookup/fd00:2:0:1::1")
    assert [a["id"] for a in found.json()["allocations"]] == [ids[1]]


async def test_operations_are_counted_by_pool_and_result(
    client: KipamClient, http: httpx.AsyncClient
) -> None:
    """Allocations and releases per pool and result are exactly the workload's, both APIs."""
    await workload(client, http)
    samples = await scrape(http)
    expected = {
        ("allocate", "m/grpc", "ok"): 5,
        ("release", "m/grpc", "ok"): 2,
        ("allocate", "m/rest", "ok"): 3,
        ("release", "m/rest", "ok"): 1,
        ("allocate", "m/full", "ok"): 2,
        ("allocate", "m/full", "exhausted"): 2,
        # A pool nobody has is counted without its name (caller input is no label).
        ("allocate", "", "not_found"): 1,
    }
    for (operation, pool, result), count in expected.items():
        found = value(samples, TOTAL, operation=operation, pool=pool, result=result)
        assert found == count, (operation, pool, result)
    assert total(samples, TOTAL, operation="allocate") == 13
    assert total(samples, TOTAL, operation="release") == 3
    assert total(samples, TOTAL, operation="create_pool", result="ok") == 3


async def test_durations_are_counted_per_operation(
    client: KipamClient, http: httpx.AsyncClient
) -> None:
    """Every use case that ran is one duration, in buckets from 0.2 ms to 5 s."""
    await workload(client, http)
    samples = await scrape(http)
    duration = "kipam_operation_duration_seconds"
    for operation in ("allocate", "release", "create_pool"):
        count = value(samples, f"{duration}_count", operation=operation)
        assert count == total(samples, TOTAL, operation=operation), operation
        assert value(samples, f"{duration}_bucket", operation=operation, le="+Inf") == count
        assert (value(samples, f"{duration}_sum", operation=operation) or 0) > 0
    assert value(samples, f"{duration}_bucket", operation="allocate", le="0.0002") is not None
    assert value(samples, f"{duration}_bucket", operation="allocate", le="5.0") is not None
    # The first allocation of each pool took the locked path: at least one wait was timed.
    assert total(samples, "kipam_lock_wait_seconds_count", backend="advisory") >= 1


async def test_pool_gauges_match_the_usage_api(
    client: KipamClient, http: httpx.AsyncClient
) -> None:
    """Utilization, allocations, free addresses and the largest free block equal /usage."""
    await workload(client, http)
    samples = await scrape(http)
    for pool in ("m/grpc", "m/rest", "m/full"):
        usage = await client.usage(pool)
        assert value(samples, "kipam_pool_utilization_ratio", pool=pool) == pytest.approx(
            usage.utilization
        )
        assert value(samples, "kipam_pool_allocations", pool=pool) == usage.allocations
        assert value(samples, "kipam_pool_free_addresses", pool=pool) == float(usage.free)
        largest = value(samples, "kipam_pool_largest_free_prefix_length", pool=pool)
        expected = usage.largest_free.length if usage.largest_free is not None else None
        assert largest == expected, pool
    rest = (await http.get("/v1/pools/m/rest/usage")).json()
    assert value(samples, "kipam_pool_utilization_ratio", pool="m/rest") == pytest.approx(
        rest["utilization"]
    )
    assert value(samples, "kipam_pool_utilization_ratio", pool="m/grpc") == pytest.approx(3 / 16)
    assert value(samples, "kipam_pool_utilization_ratio", pool="m/full") == 1.0
    assert value(samples, "kipam_pool_largest_free_prefix_length", pool="m/full") is None


async def test_database_pool_gauges_are_sane(http: httpx.AsyncClient, settings: Settings) -> None:
    """Connections in use and idle fit under the maximum; saturation is their ratio."""
    samples = await scrape(http)
    in_use = value(samples, "kipam_db_pool_connections", state="in_use")
    idle = value(samples, "kipam_db_pool_connections", state="idle")
    most = value(samples, "kipam_db_pool_max_connections")
    assert most == settings.db_pool_max
    assert in_use is not None
    assert idle is not None
    assert 0 <= in_use <= most
    assert 0 <= idle <= most - in_use
    assert value(samples, "kipam_db_pool_saturation_ratio") == pytest.approx(in_use / most)


async def test_watch_subscribers_follow_open_streams(
    client: KipamClient, http: httpx.AsyncClient
) -> None:
    """The gauge counts a WatchAllocations stream while it is open, and drops when it ends."""

    async def subscribers(count: int) -> bool:
        return value(await scrape(http), "kipam_watch_subscribers") == count

    assert await subscribers(0)

    async def watch() -> None:
        async for _ in client.watch(reconnect=False):
            pass

    task = asyncio.create_task(watch())
    try:
        await until(lambda: subscribers(1))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await until(lambda: subscribers(0))


async def test_metrics_is_prometheus_text_outside_the_api_document(
    http: httpx.AsyncClient,
) -> None:
    """The content type is the text format's; /metrics is not an API operation."""
    response = await http.get("/metrics")
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "# TYPE kipam_operations_total counter" in response.text
    schema = (await http.get("/schema/openapi.json")).json()
    assert "/metrics" not in schema["paths"]
    assert "/healthz" not in schema["paths"]
