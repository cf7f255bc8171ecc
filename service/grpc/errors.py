"""Errors to gRPC status, in one interceptor, with ``google.rpc`` details where they help.

Every handler of every service runs inside :class:`ErrorInterceptor`: an engine or service
error becomes the status of its kind (the one table, :data:`service.errors.STATUS`), plus:

* ``google.rpc.ErrorInfo`` always: ``reason`` is the kind (``EXHAUSTED``, ``CONFLICT``...),
  ``domain`` ``kipam``, and ``metadata`` the facts a program needs (``field``,
  ``conflicts``, ``pool``, ``length``, ``largest_free``);
* ``google.rpc.BadRequest`` naming the field of an invalid request;
* ``google.rpc.ResourceInfo`` naming what was not found;
* ``google.rpc.QuotaFailure`` naming the exhausted pool;
* ``google.rpc.PreconditionFailure`` for a state that forbids the change;
* ``google.rpc.RetryInfo`` for UNAVAILABLE (worth retrying after that delay).

Anything else is a bug: it is logged with its traceback and the caller gets INTERNAL with
the request id, never the traceback. :func:`service.client.error_from_rpc` is the reverse.

Requests are parsed here too, not by grpcio: grpcio's aio server answers bytes that are not
the method's message (garbage, a string field that is not UTF-8) with UNKNOWN and logs a
traceback, but they are the caller's mistake, so they are INVALID_ARGUMENT like any other.

The same interceptor gives every call its request id (the caller's ``x-request-id`` when it
is 1-128 printable characters, else a new one), for the handler in :data:`REQUEST_ID` and for
the caller in the trailing metadata, errors included, as REST's ``X-Request-ID`` header.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Final, NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.errors import ClusterCheckError, PoolExhaustedError, PrefixConflictError
from service import logs
from service.errors import (
    STATUS,
    AllocationNotFoundError,
    AlreadyExistsError,
    InvalidRequestError,
    Kind,
    PoolNotFoundError,
    RateLimitedError,
    ResourceNotFoundError,
    kind_of,
)
from service.models import make_request_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from google.protobuf.message import Message

__all__ = ["DOMAIN", "REQUEST_ID", "ErrorInterceptor", "status_for"]

_log = logging.getLogger("kipam.grpc")

DOMAIN: Final = "kipam"
_RETRY_AFTER_S: Final = 1
_KIPAM: Final = "/kipam."
# Bytes of UTF-8 kept of a message (and of a field name): messages quote the input, and a
# status travels in HTTP/2 trailers, which clients refuse beyond 16 KiB, failing the call.
_MAX_MESSAGE: Final = 1024
_MAX_FIELD: Final = 256
# The running call's request id (set by the interceptor before the handler runs).
REQUEST_ID: ContextVar[str] = ContextVar("kipam_request_id", default="")


def _pack(message: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def _resource(error: BaseException) -> error_details_pb2.ResourceInfo | None:
    """What was not found, for NOT_FOUND errors that know it."""
    if isinstance(error, PoolNotFoundError):
        return error_details_pb2.ResourceInfo(resource_type="pool", resource_name=error.name)
    if isinstance(error, ResourceNotFoundError):
        return error_details_pb2.ResourceInfo(
            resource_type=error.resource_type, resource_name=error.name
        )
    if isinstance(error, AllocationNotFoundError):
        return error_details_pb2.ResourceInfo(
            resource_type="allocation", resource_name=str(error.allocation_id)
        )
    return None


def _broken_rules(error: ClusterCheckError) -> error_details_pb2.BadRequest:
    """Each broken Kubernetes/Cilium rule of a cluster plan, as ``rule: message``."""
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="plan", description=f"{v.rule}: {v.message}"
            )
            for v in error.violations
        ]
    )


def _retry(error: BaseException) -> error_details_pb2.RetryInfo | None:
    """When to retry: after a token's rate allows it, or a second for UNAVAILABLE."""
    if isinstance(error, RateLimitedError):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, round(error.retry_after_s * 1e9)))
        return error_details_pb2.RetryInfo(retry_delay=delay)
    if kind_of(error) is Kind.UNAVAILABLE:
        return error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=_RETRY_AFTER_S)
        )
    return None


def _clip(text: str, limit: int) -> str:
    """``text``, cut to at most ``limit`` bytes of UTF-8 (marked when cut)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 16].decode(errors="ignore") + "... (truncated)"


def status_for(error: BaseException, request_id: str = "") -> grpc.Status:
    """The status (code, message, details) an error is reported with."""
    kind = kind_of(error)
    code = getattr(code_pb2, STATUS[kind].grpc)
    if kind is Kind.INTERNAL:
        message = f"Internal error (request id {request_id or 'none'}); it has been logged."
    else:
        message = _clip(getattr(error, "message", None) or str(error), _MAX_MESSAGE)
    metadata: dict[str, str] = {}
    details: list[Message] = []
    field = getattr(error, "field", None)
    if isinstance(error, InvalidRequestError) and field:
        field = _clip(field, _MAX_FIELD)
        metadata["field"] = field
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
    resource = _resource(error)
    if resource is not None:
        details.append(resource)
    if isinstance(error, ClusterCheckError):
        metadata["rules"] = ",".join(v.rule for v in error.violations)
        details.append(_broken_rules(error))
    if isinstance(error, AlreadyExistsError | PrefixConflictError) and error.conflicts:
        metadata["conflicts"] = ",".join(str(c) for c in error.conflicts)
    if isinstance(error, PoolExhaustedError):
        metadata.update(pool=str(error.pool), length=str(error.length))
        if error.largest_free is not None:
            metadata["largest_free"] = str(error.largest_free)
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"pool:{error.pool}", description=message
                    )
                ]
            )
        )
    if kind is Kind.PRECONDITION:
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="STATE", description=message
                    )
                ]
            )
        )
    retry = _retry(error)
    if retry is not None:
        details.append(retry)
    info = error_details_pb2.ErrorInfo(reason=kind.name, domain=DOMAIN, metadata=metadata)
    status = status_pb2.Status(
        code=code, message=message, details=[_pack(info), *(_pack(d) for d in details)]
    )
    return rpc_status.to_status(status)


def _begin(context: grpc.aio.ServicerContext) -> str:
    """The call's request id: kept for the handler and sent back in the trailing metadata."""
    given = next(
        (str(v) for k, v in context.invocation_metadata() or () if k == "x-request-id"), None
    )
    request_id = make_request_id(given)
    REQUEST_ID.set(request_id)
    context.set_trailing_metadata((("x-request-id", request_id),))
    return request_id


async def _abort(context: grpc.aio.ServicerContext, error: Exception, request_id: str) -> None:
    if kind_of(error) is Kind.INTERNAL:
        _log.error("request %s failed", request_id, exc_info=error)
    status = status_for(error, request_id)
    await context.abort_with_status(
        _Status(
            status.code,
            status.details,
            (*status.trailing_metadata, ("x-request-id", request_id)),
        )
    )


def _code_name(error: Exception) -> str:
    """The gRPC status code name an error is reported with."""
    return STATUS[kind_of(error)].grpc


class _Status(NamedTuple):
    """What ``abort_with_status`` reads: code, details and trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc] # grpcio is untyped
    """Turns what a handler raises into the status of its kind (see the module docstring).

    The guarded handler of each method is made once, with everything the interceptors inside
    this one (authentication) added, and reused for every later call of that method.
    """

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(  # noqa: D102 - the class says it
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is not None:
            return guarded
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(_KIPAM):
            return handler  # health and reflection: nothing of ours to map, no request id
        parse = handler.request_deserializer
        # grpcio hands the guard the request's bytes (no deserializer); the guard parses them.
        if handler.unary_unary is not None:
            guarded = grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method, parse),
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            guarded = grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method, parse),
                response_serializer=handler.response_serializer,
            )
        else:
            return handler  # kipam has no client-streaming calls
        self._guarded[method] = guarded
        return guarded


def _parse(parse: Callable[[bytes], object] | None, request: object) -> object:
    """The request message from its bytes.

    Raises:
        InvalidRequestError: the bytes are not the method's message.
    """
    if parse is None or not isinstance(request, bytes):
        return request
    try:
        return parse(request)
    except DecodeError as exc:
        raise InvalidRequestError(f"The request is not a valid message: {exc}") from exc


def _guard_unary(
    behavior: Callable[[object, grpc.aio.ServicerContext], Awaitable[object]],
    method: str,
    parse: Callable[[bytes], object] | None,
) -> Callable[[object, grpc.aio.ServicerContext], Awaitable[object]]:
    async def guarded(request: object, context: grpc.aio.ServicerContext) -> object:
        started = time.perf_counter()
        request_id = _begin(context)
        code = "OK"
        try:
            return await behavior(_parse(parse, request), context)
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except Exception as exc:
            code = _code_name(exc)
            await _abort(context, exc, request_id)
            raise AssertionError from exc  # pragma: no cover - abort raises
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            logs.request("grpc", method, code, started, request_id=request_id)

    return guarded


def _guard_stream(
    behavior: Callable[[object, grpc.aio.ServicerContext], AsyncIterator[object]],
    method: str,
    parse: Callable[[bytes], object] | None,
) -> Callable[[object, grpc.aio.ServicerContext], AsyncIterator[object]]:
    async def guarded(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        started = time.perf_counter()
        request_id = _begin(context)
        code = "OK"
        try:
            async for item in behavior(_parse(parse, request), context):
                yield item
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code = _code_name(exc)
            await _abort(context, exc, request_id)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            logs.request("grpc", method, code, started, request_id=request_id)

    return guarded
