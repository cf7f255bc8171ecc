"""What the use cases report as they work: a span per operation, and an observer for metrics.

Every use case runs inside :func:`observed`: one OpenTelemetry span (``kipam.allocate``,
``kipam.release``, ``kipam.plan_cluster``, ...) with kipam's attributes (``kipam.pool``,
``kipam.prefix``, ``kipam.prefix_length``, ``kipam.owner``, ``kipam.result``), and one call
of :meth:`Observer.operation` with its duration and result, which the Prometheus observer
(:mod:`service.metrics`) counts. The tracer is the OpenTelemetry API's: without a configured
SDK (:mod:`service.telemetry`) its spans are non-recording and cost next to nothing.

Nothing here is instrumented inside ``engine/``: the engine stays pure; its decisions are
wrapped from the service (``kipam.engine.decide``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from engine import EngineError
from service.errors import ServiceError, kind_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

__all__ = [
    "OK",
    "Observer",
    "Operation",
    "observed",
    "result_of",
    "set_tracing",
    "span_of",
    "traced",
    "tracer",
]

OK: Final = "ok"
tracer = trace.get_tracer("kipam")


class Observer:
    """Receives what the use cases report; this base records nothing (metrics off)."""

    def operation(self, name: str, pool: str, result: str, seconds: float) -> None:
        """One use case ended: its name, pool ("" if none), result kind and duration."""

    def lock_waited(self, backend: str, seconds: float) -> None:
        """A batch waited ``seconds`` for its pools' locks on ``backend`` (redis, advisory)."""


def result_of(error: BaseException | None) -> str:
    """``ok``, or the error's kind (``invalid``, ``exhausted``, ...), or ``error``."""
    if error is None:
        return OK
    if isinstance(error, ServiceError | EngineError):
        return kind_of(error).value
    return "error"


class Operation:
    """One use case under way: its span, and the pool it turned out to touch."""

    __slots__ = ("pool", "span")

    def __init__(self, span: Span, pool: str) -> None:
        self.span = span
        self.pool = pool

    def answered(self, result: object) -> None:
        """Note what the use case answered: the pool and prefix(es) of its allocations."""
        if isinstance(result, tuple) and result:
            result = result[0]
        items = result if isinstance(result, list) else [result]
        found = [item[0] if isinstance(item, tuple) and item else item for item in items]
        prefixes = [str(p) for item in found if (p := getattr(item, "prefix", None)) is not None]
        if not self.pool:
            self.pool = next((str(getattr(i, "pool", "")) for i in found if hasattr(i, "pool")), "")
        if self.span.is_recording():
            if prefixes:
                self.span.set_attribute(
                    "kipam.prefix", prefixes[0] if len(prefixes) == 1 else prefixes
                )
            if self.pool:
                self.span.set_attribute("kipam.pool", self.pool)


@contextlib.contextmanager
def observed(
    observer: Observer,
    name: str,
    *,
    pool: str = "",
    **attributes: AttributeValue | None,
) -> Iterator[Operation]:
    """Run a use case inside its span, and report its duration and result to ``observer``.

    ``attributes`` become ``kipam.<key>`` span attributes (None values are left out); the
    span gets ``kipam.result`` and, on a failure, an error status with the exception.
    """
    attrs: dict[str, AttributeValue] = {
        f"kipam.{k}": v for k, v in attributes.items() if v is not None
    }
    if pool:
        attrs["kipam.pool"] = pool
    start = time.perf_counter()
    error: BaseException | None = None
    with span_of(f"kipam.{name}", attributes=attrs) as span:
        operation = Operation(span, pool)
        try:
            yield operation
        except BaseException as exc:
            error = exc
            raise
        finally:
            result = result_of(error)
            if span.is_recording():
                span.set_attribute("kipam.result", result)
                if error is not None and result in {"error", "internal", "unavailable"}:
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            observer.operation(name, operation.pool, result, time.perf_counter() - start)


class _Switch:
    """Whether tracing is configured in this process (set by :mod:`service.telemetry`)."""

    on = False


def set_tracing(on: bool) -> None:  # noqa: FBT001 - a switch
    """Tell the use cases that a tracer provider is (or no longer is) installed."""
    _Switch.on = on


@contextlib.contextmanager
def span_of(
    name: str,
    *,
    parent: otel_context.Context | None = None,
    links: Sequence[trace.Link] = (),
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """Kipam's own span, as current, under ``parent`` (default: the current context).

    Costs nothing when tracing is off, and next to nothing under a parent that is not
    sampled (the span could not be recorded; the parent is made current instead, so
    statements below it are not sampled either).
    """
    if not _Switch.on:
        yield trace.INVALID_SPAN
        return
    context = otel_context.get_current() if parent is None else parent
    above = trace.get_current_span(context).get_span_context()
    if above.is_valid and not above.trace_flags.sampled:
        token = otel_context.attach(context) if parent is not None else None
        try:
            yield trace.INVALID_SPAN
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    with tracer.start_as_current_span(
        name,
        context=parent,
        links=links,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


F = TypeVar("F", bound="Callable[..., Awaitable[Any]]")


def traced(name: str, *, pool: str | None = None, **arguments: str) -> Callable[[F], F]:
    """Run an async use case method inside :func:`observed`.

    Args:
        name: The operation (the span is ``kipam.<name>``).
        pool: The parameter that names the pool (or cluster): the first positional
            argument when given positionally, else this keyword. Without it, the pool is
            taken from the answer (an allocation's).
        arguments: Span attribute (without ``kipam.``) to the keyword parameter it is taken
            from, e.g. ``owner="owner"``.

    The method's object must have an ``observer`` attribute (an :class:`Observer`).
    """

    def wrap(method: F) -> F:
        @functools.wraps(method)
        async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            where = (args[0] if args else kwargs.get(pool, "")) if pool else ""
            attributes = {key: _attribute(kwargs.get(arg)) for key, arg in arguments.items()}
            with observed(self.observer, name, pool=str(where), **attributes) as operation:
                result = await method(self, *args, **kwargs)
                operation.answered(result)
                return result

        return run  # type: ignore[return-value]

    return wrap


def _attribute(value: object) -> AttributeValue | None:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return str(value)
