"""``/v1/tokens``: create, list and revoke API tokens (admin scope).

The same operations as ``kipam token create|list|revoke``, which work on the database
directly (so the first admin token needs no token). The secret is in the answer of the
create, once.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody  # noqa: TC002 - Litestar reads them

from service.auth import Authenticator, Scope, parse_duration
from service.rest.guard import principal_of
from service.rest.routes import errors
from service.rest.schemas import TokenCreatedOut, TokenIn, TokenList, TokenOut

__all__ = ["TokenController"]

Auth = NamedDependency[Authenticator]


class TokenController(Controller):
    """API tokens: who may read, allocate or administer (admin scope)."""

    path = "/v1/tokens"
    tags = ["tokens"]  # noqa: RUF012 - Litestar's class attribute

    @post(
        "/",
        operation_id="CreateToken",
        summary="Create an API token",
        description="`scope` read, allocate or admin; `pools` limits a read or allocate token "
        "to pools matching these patterns (`eu1-prod/*`); `expires` a duration (`90d`). The "
        "answer carries the token in `token`, this once: only a salted hash is stored.",
        responses=errors(409, 422),
    )
    async def create(
        self, auth: Auth, request: Request[Any, Any, Any], data: JSONBody[TokenIn]
    ) -> TokenCreatedOut:
        """Create a token; its secret is in the answer, this once."""
        token, secret = await auth.tokens.create(
            data.name,
            Scope.parse(data.scope),
            pools=data.pools,
            expires_in=parse_duration(data.expires) if data.expires else None,
            created_by=principal_of(request).name,
        )
        return TokenCreatedOut.created(token, secret)

    @get("/", operation_id="ListTokens", summary="List API tokens", responses=errors(422))
    async def list_tokens(
        self, auth: Auth, *, include_revoked: FromQuery[bool] = False
    ) -> TokenList:
        """Tokens by name; revoked ones with ``include_revoked``."""
        tokens = await auth.tokens.list(include_revoked=include_revoked)
        return TokenList(items=[TokenOut.from_model(t) for t in tokens])

    @delete(
        "/{name:str}",
        operation_id="RevokeToken",
        summary="Revoke an API token",
        description="At once on this replica; on the others within `KIPAM_AUTH_CACHE_S`.",
        status_code=200,
        responses=errors(404),
    )
    async def revoke(self, auth: Auth, name: FromPath[str]) -> TokenOut:
        """Revoke the live token of this name."""
        token, key_id = await auth.tokens.revoke(name)
        auth.forget(key_id)
        return TokenOut.from_model(token)
