"""Tracing end to end: one trace per allocation, from the caller's context to each statement.

The spans go to an in-memory exporter here; tests/e2e/test_otlp.py sends them over OTLP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import observe, telemetry
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import allocation_pb2_grpc as apb_grpc
from service.models import PoolPolicy
from tests.api.conftest import serving, serving_http, until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from service.config import Settings
    from service.store import Database

pytestmark = [pytest.mark.integration, pytest.mark.api]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture(name="spans", scope="module")
def _spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this module: every span into memory, asyncpg and Redis instrumented."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; later modules get it unused
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    telemetry._current = telemetry.Telemetry(provider, ("memory",))
    observe.set_tracing(True)
    try:
        yield exporter
    finally:
        telemetry._current = None
        observe.set_tracing(False)
        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        RedisInstrumentor().uninstrument()
        exporter.clear()


@pytest_asyncio.fixture(name="traced", loop_scope="session")
async def _traced(
    spans: InMemorySpanExporter, db: Database, settings: Settings, redis_url: str, clean: None
) -> AsyncIterator[tuple[str, str]]:
    """A replica on Redis locks with tracing on: its gRPC address and REST URL."""
    _ = clean
    async with (
        serving(db, settings, redis_url=redis_url) as server,
        serving_http(server) as url,
    ):
        await server.res.kipam.create_pool(
            "site", cidr="fd3c:9e12:7a40::/48", policy=PoolPolicy(default_length=64)
        )
        spans.clear()
        yield f"127.0.0.1:{server.port}", url


def tree(spans: list[ReadableSpan], trace_id: str) -> dict[str, list[ReadableSpan]]:
    """The trace's spans by name."""
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if span.context is not None and f"{span.context.trace_id:032x}" == trace_id:
            out.setdefault(span.name, []).append(span)
    return out


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan | None:
    """The span's parent among ``spans``."""
    if span.parent is None:
        return None
    return next(
        (s for s in spans if s.context is not None and s.context.span_id == span.parent.span_id),
        None,
    )


def ancestors(span: ReadableSpan, spans: list[ReadableSpan]) -> list[str]:
    """The names from the span up to its root."""
    names = []
    current: ReadableSpan | None = span
    while current is not None:
        names.append(current.name)
        current = parent_of(current, spans)
    return names


def check_allocation_trace(spans: list[ReadableSpan], server_span: str) -> dict[str, Any]:
    """The shape every traced allocation has, whichever transport carried it."""
    named = tree(spans, CALLER_TRACE)
    mine = [s for group in named.values() for s in group]
    (server,) = named[server_span]
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN  # the caller's trace continues
    (allocate,) = named["kipam.allocate"]
    assert parent_of(allocate, mine) is server or server_span in ancestors(allocate, mine)
    attributes = dict(allocate.attributes or {})
    assert attributes["kipam.pool"] == "site"
    assert attributes["kipam.owner"] == "node/worker-1"
    assert attributes["kipam.result"] == "ok"
    assert str(attributes["kipam.prefix"]).endswith("/64")
    batch = named["kipam.batch"][0]
    assert parent_of(batch, mine) is allocate
    decide = named["kipam.engine.decide"][0]
    assert "kipam.batch" in ancestors(decide, mine)
    sql = [s for s in mine if (s.attributes or {}).get("db.system") == "postgresql"]
    assert sql, sorted(named)
    assert all(
        "kipam.batch" in ancestors(s, mine) or "kipam.allocate" in ancestors(s, mine) for s in sql
    )
    (wait,) = named["kipam.lock.wait"]
    assert (wait.attributes or {})["kipam.lock.backend"] == "redis"
    redis = [s for s in mine if (s.attributes or {}).get("db.system") == "redis"]
    assert redis, sorted(named)
    assert all("kipam.batch" in ancestors(s, mine) for s in redis)
    return attributes


async def test_a_grpc_allocation_is_one_trace_down_to_sql_and_redis(
    traced: tuple[str, str], spans: InMemorySpanExporter
) -> None:
    """gRPC: the caller's trace, the call, the use case, the batch, locks, engine, SQL, Redis."""
    address, _ = traced
    async with grpc.aio.insecure_channel(address) as channel:
        stub = apb_grpc.AllocationServiceStub(channel)
        answer = await stub.AllocatePrefix(
            apb.AllocatePrefixRequest(pool="site", owner="node/worker-1", prefix_length=64),
            metadata=(("traceparent", TRACEPARENT),),
        )
    await until(lambda: "kipam.batch" in tree(spans.get_finished_spans(), CALLER_TRACE))
    finished = list(spans.get_finished_spans())
    check_allocation_trace(finished, "/kipam.v1.AllocationService/AllocatePrefix")
    assert answer.allocation.prefix.endswith("/64")


async def test_a_rest_allocation_is_one_trace_and_history_names_it(
    traced: tuple[str, str], spans: InMemorySpanExporter
) -> None:
    """REST: the same tree under the HTTP server span; the history keeps the trace id."""
    _, url = traced
    async with httpx.AsyncClient(base_url=url) as http:
        made = await http.post(
            "/v1/pools/site/allocations",
            json={"owner": "node/worker-1", "prefix_length": 64},
            headers={"traceparent": TRACEPARENT},
        )
        assert made.status_code == 201, made.text
        await until(lambda: "kipam.batch" in tree(spans.get_finished_spans(), CALLER_TRACE))
        finished = list(spans.get_finished_spans())
        server_spans = [
            s.name
            for s in finished
            if s.kind is trace.SpanKind.SERVER and f"{s.context.trace_id:032x}" == CALLER_TRACE
        ]
        check_allocation_trace(finished, server_spans[0])
        history = await http.get("/v1/history", params={"pool": "site"})
    created = [c for c in history.json()["items"] if c["kind"] == "allocation.created"]
    assert created[-1]["trace_id"] == CALLER_TRACE
