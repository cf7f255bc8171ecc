"""Structured logs: the JSON shape, trace ids, the request line, the access log middleware."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from service import logs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@contextlib.contextmanager
def configured(level: str, log_format: str) -> Iterator[io.StringIO]:
    """Logs configured into a buffer; the process's configuration back afterwards."""
    root = logging.getLogger()
    handlers, previous = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.configure(level, log_format, buffer)
    try:
        yield buffer
    finally:
        root.handlers, root.level = handlers, previous
        logs._json_stream = None
        structlog.reset_defaults()


@pytest.fixture(name="stderr")
def _stderr() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """JSON logs into a buffer; the lines written so far, parsed."""
    with configured("info", "json") as buffer:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_every_logger_writes_one_json_object_per_line(
    stderr: Callable[[], list[dict[str, Any]]],
) -> None:
    """Stdlib loggers (kipam's, libraries') come out as JSON with time, level and fields."""
    logging.getLogger("kipam.test").warning(
        "pool %s is %d%% full", "eu1", 91, extra={"pool": "eu1"}
    )
    (line,) = stderr()
    assert line["event"] == "pool eu1 is 91% full"
    assert (line["level"], line["logger"], line["pool"]) == ("warning", "kipam.test", "eu1")
    assert line["timestamp"].endswith("Z")
    assert "trace_id" not in line


def test_lines_inside_a_span_carry_its_ids(stderr: Callable[[], list[dict[str, Any]]]) -> None:
    """Within a recorded span, every line (and the request line) names the trace and span."""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("kipam.test").info("inside")
        logs.request(
            "grpc",
            "/kipam.v1.AllocationService/AllocatePrefix",
            "OK",
            time.perf_counter(),
            request_id="r-1",
        )
    inside, request = stderr()
    context = span.get_span_context()
    for line in (inside, request):
        assert line["trace_id"] == f"{context.trace_id:032x}"
        assert line["span_id"] == f"{context.span_id:016x}"
    assert request["event"] == "request"
    assert (request["protocol"], request["status"], request["request_id"]) == ("grpc", "OK", "r-1")
    assert request["duration_ms"] >= 0


def test_requests_are_quiet_above_info(capsys: pytest.CaptureFixture[str]) -> None:
    """KIPAM_LOG_LEVEL=warning drops the request lines; a bad level or format is refused."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure("warning", "json")
        logs.request("http", "GET /v1/pools", 200, time.perf_counter())
        assert capsys.readouterr().err == ""
        logs.configure("info", "console")
        logs.request("http", "GET /v1/pools", 200, time.perf_counter())
        assert "GET /v1/pools" in capsys.readouterr().err
        for bad in (("loud", "json"), ("info", "xml")):
            with pytest.raises(ValueError, match="log"):
                logs.configure(*bad)
    finally:
        root.handlers, root.level = handlers, level
        logs._json_stream = None
        structlog.reset_defaults()


async def test_the_access_log_writes_one_line_per_request(
    stderr: Callable[[], list[dict[str, Any]]],
) -> None:
    """Method, path, status and request id; probes are left out; headers never written."""

    async def app(scope: dict[str, Any], _receive: Any, send: Any) -> None:
        status = 404 if scope["path"] == "/missing" else 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"x-request-id", b"r-9")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(_message: dict[str, Any]) -> None:
        return None

    logged = logs.AccessLog(app)
    for path in ("/v1/pools", "/missing", "/healthz"):
        scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "headers": [(b"authorization", b"Bearer secret-token")],
        }
        await logged(scope, receive, send)
    lines = stderr()
    assert [(line["target"], line["status"]) for line in lines] == [
        ("GET /v1/pools", 200),
        ("GET /missing", 404),
    ]
    assert all(line["request_id"] == "r-9" for line in lines)
    assert "secret-token" not in json.dumps(lines)
