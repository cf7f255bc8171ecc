"""What happens to a request before Litestar routes it: request ids, pool names in paths.

Every request gets an ``x-request-id`` (the caller's, when it is 1-128 printable characters,
else a new one); it is recorded with every change the request makes and echoed in the
response's ``X-Request-ID`` header, errors included, so an operator can find the history of
a call from its response (:class:`RequestIds`).

Pool names in paths: ``/v1/pools/eu1-prod/pod/usage`` is the usage of ``eu1-prod/pod``.

Litestar matches a path parameter to one segment (or, typed ``path``, to the rest of the
path), so a name with ``/`` followed by a sub-resource cannot be a route of its own.
:class:`PoolPaths`, an ASGI wrapper in front of the router, folds the segments of a name
into one percent-encoded segment (``/v1/pools/eu1-prod%2Fpod/usage``); the handlers decode
it. A name may also be sent encoded. A name's last segment is never a sub-resource
(:data:`service.models.SUBRESOURCES`), so the reading is unambiguous.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import quote

from litestar.enums import ScopeType

from service.models import SUBRESOURCES, make_request_id

if TYPE_CHECKING:
    from litestar import Request
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ORIGINAL_PATH", "PoolPaths", "RequestIds", "original_path"]

_POOLS: Final = "/v1/pools/"
ORIGINAL_PATH: Final = "kipam.original_path"  # the path as sent, before PoolPaths folded it


class PoolPaths:
    """Folds a pool name's segments into one path segment before routing (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Rewrite ``/v1/pools/<a>/<b>[/<sub-resource>]``, then route as usual."""
        if scope["type"] == ScopeType.HTTP and scope["path"].startswith(_POOLS):
            segments = scope["path"][len(_POOLS) :].rstrip("/").split("/")
            sub = segments.pop() if len(segments) > 1 and segments[-1] in SUBRESOURCES else None
            path = _POOLS + quote("/".join(segments), safe="") + (f"/{sub}" if sub else "")
            scope = cast("Scope", {**scope, "path": path, ORIGINAL_PATH: scope["path"]})
        await self.app(scope, receive, send)


class RequestIds:
    """Gives every HTTP request an ``x-request-id`` and echoes it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the id to the request's headers and to the response's start."""
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        raw = make_request_id(given.decode("latin-1") if given is not None else None).encode(
            "latin-1"
        )
        headers = [(k, v) for k, v in scope["headers"] if k != b"x-request-id"]
        scope = cast("Scope", {**scope, "headers": [*headers, (b"x-request-id", raw)]})

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = cast(
                    "Message",
                    {**message, "headers": [*message.get("headers", []), (b"x-request-id", raw)]},
                )
            await send(message)

        await self.app(scope, receive, send_with_id)


def original_path(request: Request[Any, Any, Any]) -> str:
    """The path the client sent (a pool's name with its ``/``, not folded)."""
    return str(request.scope.get(ORIGINAL_PATH) or request.url.path)
