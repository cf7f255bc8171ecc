"""Structured logs: one JSON object per line, or aligned key=value on a terminal.

:func:`configure` routes every ``logging`` logger (kipam's, uvicorn's, asyncpg's) through
structlog's formatter, so all lines have the same shape: ``timestamp`` (UTC, ISO 8601),
``level``, ``logger``, ``event`` and the call's fields, plus ``trace_id`` and ``span_id``
when the line is written inside a recorded span, so a line leads to its trace.
``KIPAM_LOG_FORMAT`` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON
otherwise); ``KIPAM_LOG_LEVEL`` the level (``info``).

Each request gets one line at info (:func:`request`): REST from an ASGI middleware
(:class:`AccessLog`), gRPC from the error interceptor; method, path or RPC, status, duration
and request id. Never headers, bodies or tokens.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Final

import msgspec
import structlog
from opentelemetry import trace

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["FORMATS", "AccessLog", "configure", "request"]

# ASGI, as plain mappings (the middleware reads only a few keys).
Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Any

FORMATS: Final = ("auto", "json", "console")
_requests = logging.getLogger("kipam.requests")


def _trace_ids(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """Add the current span's trace and span ids (when tracing records it)."""
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = f"{span.trace_id:032x}"
        event["span_id"] = f"{span.span_id:016x}"
    return event


def configure(level: str = "info", log_format: str = "auto", stream: IO[str] | None = None) -> None:
    """Send every log line through structlog, as JSON or for a terminal, to ``stream``.

    ``stream`` is standard error unless given (tests give a buffer).

    Raises:
        ValueError: an unknown level or format.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        message = f"log level {level!r} is not one of debug, info, warning, error"
        raise ValueError(message)  # noqa: TRY004 - a bad value, named by the caller
    stream = sys.stderr if stream is None else stream
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    shared: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _trace_ids,
    ]
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer()
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    global _json_stream  # noqa: PLW0603 - the one process-wide log configuration
    _json_stream = None if console else handler.stream
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def request(protocol: str, target: str, status: str | int, started: float, **fields: Any) -> None:
    """The one info line of a finished request (REST or gRPC).

    The hot path of logging: with JSON it skips ``logging``'s record and formatter chain and
    writes the same fields the formatter would (one encoder call, one write); otherwise it
    goes through ``logging`` like any line.
    """
    if not _requests.isEnabledFor(logging.INFO):
        return
    fields = {
        "protocol": protocol,
        "target": target,
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        **fields,
    }
    stream = _json_stream
    if stream is None:
        _requests.info("request", extra=fields)
        return
    line: dict[str, Any] = {"event": "request", **fields, "level": "info", "logger": _requests.name}
    line["timestamp"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    _trace_ids(None, "", line)
    stream.write(msgspec.json.encode(line).decode() + "\n")


# Where JSON request lines go directly (the root handler's stream); None: through logging.
_json_stream: Any = None


class AccessLog:
    """ASGI middleware: one :func:`request` line per HTTP request (method, path, status)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        """Pass the request on; log it once its response has started (or it failed)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = [500]
        request_id: list[str] = [""]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                request_id[0] = _header(message, b"x-request-id")
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            if path not in {"/healthz", "/readyz", "/metrics"}:  # probes and scrapes
                request(
                    "http",
                    f"{scope.get('method', '')} {path}",
                    status[0],
                    started,
                    request_id=request_id[0],
                )


def _header(message: MutableMapping[str, Any], name: bytes) -> str:
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""
