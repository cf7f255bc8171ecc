"""Authentication and authorization of every ``/v1`` request, in one Litestar guard.

The caller's token is the ``Authorization: Bearer kipam_...`` header. :func:`auth_guard`
authenticates it (:class:`service.auth.Authenticator`) and asks the one policy
(:func:`service.auth.check`) with the operation id (the gRPC method name) and the pool,
cluster or allocation the path or query names, before the body is read and the handler runs,
so a refused request writes nothing. The principal is then in the request's state for the
handler (the actor of its changes, :func:`principal_of`). Health, readiness, metrics and the
API document are outside ``/v1`` and open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from service.auth import ANONYMOUS, Principal, Target, check

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler

    from service.app import Resources

__all__ = ["auth_guard", "principal_of"]

_API: Final = "/v1/"
_STATE_KEY: Final = "kipam_principal"


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """Who makes the request (the guard put it in the request's state)."""
    principal: Principal = connection.scope.get("state", {}).get(_STATE_KEY, ANONYMOUS)
    return principal


def _named(connection: ASGIConnection[Any, Any, Any, Any]) -> Callable[[Target], object]:
    path, query = connection.path_params, connection.query_params

    def named(target: Target) -> object:
        if target is Target.POOL:
            return unquote(path["name"]) if "name" in path else query.get("pool")
        if target is Target.POOL_OR_EVERY:
            return query.get("pool")
        if target is Target.CLUSTER:
            return path.get("name")
        if target is Target.ALLOCATION:
            return path.get("allocation_id")
        return None

    return named


def auth_guard(
    res: Resources,
) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]:
    """The guard of the application (every route; it lets non-``/v1`` paths through)."""

    async def guard(
        connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        if not res.auth.required or not connection.scope["path"].startswith(_API):
            return  # open: every caller is ANONYMOUS (principal_of's default)
        operation = getattr(handler, "operation_id", None)
        principal = await res.auth.authenticate(connection.headers.get("authorization"))
        await check(
            principal,
            operation if isinstance(operation, str) else "",
            _named(connection),
            res.kipam.pool_of,
        )
        connection.scope.setdefault("state", {})[_STATE_KEY] = principal

    return guard
