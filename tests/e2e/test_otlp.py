"""A running `kipam serve` exports its spans over OTLP/gRPC, continuing the caller's trace.

The receiver is an OTLP TraceService built in the test from the `opentelemetry-proto`
messages: what a collector, Jaeger or Tempo would receive.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import live_server_process
from tests.e2e.test_cli import kipam

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.slow]

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Keeps every span it is sent, by name, with its trace id and attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def Export(  # noqa: N802 - the proto's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, _context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Store the spans of one export."""
        with self.lock:
            for resource in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "service": service.get("service.name"),
                                "attributes": {
                                    a.key: a.value.string_value or a.value.int_value
                                    for a in span.attributes
                                },
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, trace_id: str) -> set[str]:
        """The names of the spans of one trace received so far."""
        with self.lock:
            return {s["name"] for s in self.spans if s["trace_id"] == trace_id}


@pytest.fixture(name="receiver")
def _receiver(free_port: Callable[[], int]) -> Iterator[tuple[Receiver, int]]:
    """An OTLP/gRPC trace receiver on a free loopback port."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)


def test_spans_reach_an_otlp_receiver_with_the_callers_trace(
    receiver: tuple[Receiver, int],
    server_dsn: str,
    free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The CLI continues the script's TRACEPARENT; the server's spans arrive over OTLP."""
    spans, port = receiver
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "kipam-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "KIPAM_LOG_FORMAT": "json",
    }
    with live_server_process(server_dsn, free_port, tmp_path_factory, otel) as live:
        environment = {**os.environ, **otel, "TRACEPARENT": TRACEPARENT}
        created = kipam(
            live.grpc,
            "pool",
            "create",
            "site",
            "--cidr",
            "fd3c:9e12:7a40::/48",
            "-o",
            "json",
            env=environment,
        )
        assert created.returncode == 0, created.stderr
        made = kipam(
            live.grpc,
            "allocate",
            "site",
            "--owner",
            "node/worker-1",
            "--length",
            "64",
            "-o",
            "json",
            env=environment,
        )
        assert made.returncode == 0, made.stderr
        prefix = json.loads(made.stdout)["prefix"]
        deadline = time.monotonic() + 20
        wanted = {"kipam.allocate", "kipam.batch", "kipam.engine.decide", "kipam.lock.wait"}
        while not wanted <= spans.named(CALLER_TRACE):
            assert time.monotonic() < deadline, sorted(spans.named(CALLER_TRACE))
            time.sleep(0.05)
    received = [s for s in spans.spans if s["trace_id"] == CALLER_TRACE]
    services = {s["service"] for s in received}
    assert "kipam-under-test" in services  # the server's spans (the CLI's share the name)
    assert "kipam allocate" in spans.named(CALLER_TRACE)  # the CLI's own span
    (allocate,) = [s for s in received if s["name"] == "kipam.allocate"]
    assert allocate["attributes"]["kipam.prefix"] == prefix
    assert allocate["attributes"]["kipam.pool"] == "site"
    sql = [s for s in received if s["attributes"].get("db.system") == "postgresql"]
    assert sql
    # The server's log: JSON lines; the allocation's request line carries the caller's trace.
    lines = [json.loads(line) for line in live.log.read_text().splitlines() if line.strip()]
    requests = [line for line in lines if line.get("event") == "request"]
    (call,) = [r for r in requests if r["target"].endswith("/AllocatePrefix")]
    assert (call["protocol"], call["status"], call["level"]) == ("grpc", "OK", "info")
    assert call["trace_id"] == CALLER_TRACE
    assert call["request_id"]
    assert call["duration_ms"] > 0
