"""Errors as RFC 9457 problem details, from the one table (:data:`service.errors.STATUS`).

Every error a handler raises, and every error Litestar raises before a handler runs (a
malformed body or query, an unknown path or method), becomes ``application/problem+json``:
``type`` is ``urn:kipam:problem:<kind>``, ``status`` comes from the table, ``detail`` is the
message, and the facts a program needs are extension members: ``field`` (which input is
wrong), ``conflicts`` (the held prefixes in the way), ``pool``/``length``/``largest_free``
(what an exhausted pool still has). Anything unexpected is logged with its traceback and
answered 500 with the request id only.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any, Final

import msgspec
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    ValidationException,
)
from litestar.response import Response

from engine.errors import ClusterCheckError, PoolExhaustedError, PrefixConflictError
from service.errors import STATUS, AlreadyExistsError, Kind, RateLimitedError, kind_of
from service.rest.paths import original_path
from service.rest.schemas import Problem, RuleViolation

if TYPE_CHECKING:
    from litestar import Request

__all__ = ["PROBLEM_MEDIA_TYPE", "handle"]

_log = logging.getLogger("kipam.rest")

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
_TITLES: Final = {
    Kind.INVALID: "Invalid request",
    Kind.NOT_FOUND: "Not found",
    Kind.CONFLICT: "Conflict",
    Kind.EXHAUSTED: "Pool exhausted",
    Kind.PRECONDITION: "Precondition failed",
    Kind.UNAVAILABLE: "Service unavailable",
    Kind.UNAUTHENTICATED: "Unauthenticated",
    Kind.FORBIDDEN: "Forbidden",
    Kind.RATE_LIMITED: "Too many requests",
    Kind.INTERNAL: "Internal error",
}
# msgspec's "... - at `$.requests[0].owner`" and "unknown field `x`" name the field.
_AT: Final = re.compile(r"at `\$\.?([^`]*)`|unknown field `([^`]*)`")


def _problem(
    request: Request[Any, Any, Any], problem: Problem, retry_after_s: float = 1.0
) -> Response[bytes]:
    problem.instance = original_path(request)
    problem.request_id = request.headers.get("x-request-id") or None
    headers: dict[str, str] | None = None
    if problem.status in {429, 503}:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    elif problem.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="kipam"'}
    return Response(
        msgspec.json.encode(problem),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _of_kind(kind: Kind, detail: str, **extra: object) -> Problem:
    return Problem(
        type=f"urn:kipam:problem:{kind.value}",
        title=_TITLES[kind],
        status=STATUS[kind].http,
        detail=detail,
        kind=kind.value,
        **extra,  # type: ignore[arg-type]
    )


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The problem response for any exception (Litestar's exception handler for all)."""
    if isinstance(exc, ValidationException):
        return _problem(request, _validation(exc))
    if isinstance(exc, NotFoundException):
        return _problem(request, _of_kind(Kind.NOT_FOUND, "There is no such resource."))
    if isinstance(exc, HTTPException | UnicodeDecodeError):
        return _problem(request, _http(exc))
    kind = kind_of(exc)
    if kind is Kind.INTERNAL:
        _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _problem(
            request, _of_kind(kind, "Internal error; it has been logged with the request id.")
        )
    message = getattr(exc, "message", None) or str(exc)
    extra: dict[str, object] = {}
    if getattr(exc, "field", None):
        extra["field"] = exc.field  # type: ignore[attr-defined]
    if isinstance(exc, AlreadyExistsError | PrefixConflictError) and exc.conflicts:
        extra["conflicts"] = [str(c) for c in exc.conflicts]
    if isinstance(exc, ClusterCheckError):
        extra["violations"] = [
            RuleViolation(rule=v.rule, message=v.message, reference=v.reference)
            for v in exc.violations
        ]
    if isinstance(exc, PoolExhaustedError):
        extra.update(pool=str(exc.pool), length=exc.length)
        if exc.largest_free is not None:
            extra["largest_free"] = str(exc.largest_free)
    retry = exc.retry_after_s if isinstance(exc, RateLimitedError) else 1.0
    return _problem(request, _of_kind(kind, message, **extra), retry)


def _http(exc: HTTPException | UnicodeDecodeError) -> Problem:
    """What Litestar raised itself (405, 413, 400 for malformed JSON...), as a problem.

    msgspec raises ``UnicodeDecodeError`` (not its ``DecodeError``) for a JSON body whose
    strings are not UTF-8: that is a malformed body too, 400 like malformed JSON.
    """
    if isinstance(exc, UnicodeDecodeError):
        detail = f"The request is not valid UTF-8 (byte {exc.start}: {exc.reason})."
        return Problem(type="about:blank", title="Bad Request", status=400, detail=detail)
    return Problem(
        type="about:blank",
        title=exc.detail or "HTTP error",
        status=exc.status_code,
        detail=exc.detail or "",
    )


def _validation(exc: ValidationException) -> Problem:
    """A body, query or path that does not fit its schema: 422 with the field named."""
    field: str | None = None
    detail = exc.detail or "The request does not fit the schema."
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            field = item.get("key") or field
            message = item.get("message")
            if message:
                detail = str(message)
                found = _AT.search(detail)
                if found and (found.group(1) or found.group(2)):
                    field = found.group(1) or found.group(2)
            break
    return _of_kind(Kind.INVALID, detail, field=field)
