"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` environment variables.

:func:`configure` reads them once per process (``kipam serve`` and the CLI call it):

- ``OTEL_SDK_DISABLED=true`` turns everything off.
- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none`` (a comma list is allowed).
  Unset, it is ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, and ``none`` otherwise.
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc``
  (default, the collector's port 4317) or ``http/protobuf`` (port 4318). The exporters read
  their endpoint, headers, timeout, compression and certificates from the variables the
  specification names.
- ``OTEL_SERVICE_NAME`` (default ``kipam``) and ``OTEL_RESOURCE_ATTRIBUTES`` make the
  resource; ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` choose the sampler;
  ``OTEL_BSP_*`` tune the batch span processor. The SDK reads these itself.

With tracing off nothing is installed: no tracer provider (the API's spans are
non-recording), no instrumentation of asyncpg, Redis, gRPC or ASGI. With it on, the official
instrumentations add a span for each SQL statement (asyncpg), Redis command, gRPC call
(server interceptor) and HTTP request (ASGI middleware), and W3C ``traceparent`` is taken
from callers and sent by kipam's client.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from service import observe
from service.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Mapping, MutableMapping


__all__ = ["Telemetry", "configure", "inject", "server_interceptors", "wrap_asgi"]

_log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME: Final = "kipam"
_EXPORTERS: Final = ("otlp", "console", "none")
_PROTOCOLS: Final = ("grpc", "http/protobuf")
# Probes and scrapes are not worth a trace each.
_EXCLUDED_URLS: Final = "healthz,readyz,metrics,schema"


@dataclass(slots=True)
class Telemetry:
    """The process's tracing, once configured; :meth:`shutdown` flushes what is queued."""

    provider: TracerProvider
    exporters: tuple[str, ...]

    def shutdown(self) -> None:
        """Export what is still queued (bounded by the processor's timeout), then stop."""
        self.provider.shutdown()


_current: Telemetry | None = None


def exporters_from(env: Mapping[str, str]) -> tuple[str, ...]:
    """The trace exporters the environment asks for; () when tracing is off.

    Raises:
        InvalidRequestError: an exporter or protocol kipam does not have.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        named = "otlp" if endpoint else "none"
    chosen = tuple(dict.fromkeys(n.strip() for n in named.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in _EXPORTERS]
    if unknown:
        raise InvalidRequestError(
            f"OTEL_TRACES_EXPORTER={named!r}: kipam exports traces with "
            f"{', '.join(_EXPORTERS)}, not {', '.join(unknown)}.",
            field="OTEL_TRACES_EXPORTER",
        )
    if "otlp" in chosen:
        _protocol(env)
    return tuple(n for n in chosen if n != "none")


def _protocol(env: Mapping[str, str]) -> str:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol not in _PROTOCOLS:
        raise InvalidRequestError(
            f"OTLP protocol {protocol!r} is not one of {', '.join(_PROTOCOLS)}.",
            field="OTEL_EXPORTER_OTLP_PROTOCOL",
        )
    return protocol


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if _protocol(env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def configure(env: Mapping[str, str] | None = None, *, instrument: bool = True) -> Telemetry | None:
    """Set up tracing as the environment says; None when it is off. Idempotent per process.

    Args:
        env: The environment (default ``os.environ``).
        instrument: Also instrument asyncpg and Redis (the server); the CLI needs neither.

    Raises:
        InvalidRequestError: an unknown exporter or protocol.
    """
    global _current  # noqa: PLW0603 - one tracer provider per process, as OpenTelemetry has it
    if _current is not None:
        return _current
    env = os.environ if env is None else env
    chosen = exporters_from(env)
    if not chosen:
        return None
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in chosen:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    trace.set_tracer_provider(provider)
    if instrument:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor  # noqa: PLC0415
        from opentelemetry.instrumentation.redis import RedisInstrumentor  # noqa: PLC0415

        AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
        RedisInstrumentor().instrument(tracer_provider=provider)
    _current = Telemetry(provider, chosen)
    observe.set_tracing(True)
    _log.info("tracing on: exporting with %s", ", ".join(chosen))
    return _current


def current() -> Telemetry | None:
    """The process's tracing, or None when it is off."""
    return _current


def server_interceptors() -> list[Any]:
    """The gRPC server's tracing interceptor (outermost), or none when tracing is off."""
    if _current is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters  # noqa: PLC0415

    # Health probes are not worth a trace each.
    quiet = filters.negate(filters.health_check())
    return [aio_server_interceptor(tracer_provider=_current.provider, filter_=quiet)]  # type: ignore[no-untyped-call]


A = TypeVar("A")


def wrap_asgi(app: A) -> A:
    """The HTTP app inside the ASGI tracing middleware, or as it is when tracing is off."""
    if _current is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # noqa: PLC0415

    wrapped: Any = OpenTelemetryMiddleware(
        app, excluded_urls=_EXCLUDED_URLS, tracer_provider=_current.provider
    )
    return cast("A", wrapped)


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add the current trace context (``traceparent``) to an outgoing call's metadata."""
    propagate.inject(carrier)
