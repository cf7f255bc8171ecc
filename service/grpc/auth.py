"""Authentication and authorization of every kipam.v1 call, in one interceptor.

The caller's token is the ``authorization`` metadata (``Bearer kipam_...``), as REST's
header. :class:`AuthInterceptor` authenticates it (:class:`service.auth.Authenticator`) and
asks the one policy (:func:`service.auth.check`) with the method name and the pool, cluster
or allocation the request names, before the handler runs, so a refused call writes nothing.
The principal is then :data:`service.auth.PRINCIPAL` for the handler (the actor of its
changes). Health and reflection are open: probes and tools carry no token. A watch is
authorized when it starts.

It runs inside :class:`service.grpc.errors.ErrorInterceptor`, which turns its refusals into
UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED (over the token's rate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import grpc

from service.auth import PRINCIPAL, Principal, Target, check

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from service.auth import Authenticator
    from service.usecases import Kipam

__all__ = ["AuthInterceptor"]

_KIPAM: Final = "/kipam."
# The request field that names each target, in the order looked for.
_FIELDS: Final = {
    Target.POOL: ("pool", "name"),
    Target.POOL_OR_EVERY: ("pool",),
    Target.CLUSTER: ("cluster", "name"),
    Target.ALLOCATION: ("id",),
}


def _named(request: Any) -> Callable[[Target], object]:
    fields = request.DESCRIPTOR.fields_by_name

    def named(target: Target) -> object:
        for name in _FIELDS.get(target, ()):
            if name in fields:
                return getattr(request, name) or None
        return None

    return named


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc] # grpcio is untyped
    """Lets a kipam.v1 call through only with a token allowed to make it."""

    def __init__(self, authenticator: Authenticator, kipam: Kipam) -> None:
        self.authenticator = authenticator
        self.kipam = kipam

    async def intercept_service(  # noqa: D102 - the class says it
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not self.authenticator.required:
            return handler  # every caller is ANONYMOUS, PRINCIPAL's default: nothing to add
        if handler is None or not handler_call_details.method.startswith(_KIPAM):
            return handler  # health and reflection are open
        operation = handler_call_details.method.rpartition("/")[2]
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def guarded_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                PRINCIPAL.set(await self._admit(operation, request, context))
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def guarded_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                PRINCIPAL.set(await self._admit(operation, request, context))
                async for item in stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                guarded_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # kipam has no client-streaming calls

    async def _admit(
        self, operation: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Principal:
        header = next(
            (str(v) for k, v in context.invocation_metadata() or () if k == "authorization"),
            None,
        )
        principal = await self.authenticator.authenticate(header)
        await check(principal, operation, _named(request), self.kipam.pool_of)
        return principal
