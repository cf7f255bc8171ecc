"""The REST application: ``/v1`` controllers, health, OpenAPI with its UI, problem details.

``GET /schema`` is an interactive Swagger UI (calls can be tried from the page), served with
its JavaScript from the ``swagger-ui-py`` wheel, so it works where browsers cannot reach a
CDN (air-gapped sites); ``GET /schema/openapi.json`` is the OpenAPI 3.1 document.
``GET /metrics`` answers the Prometheus text format (:mod:`service.metrics`), outside the
OpenAPI document like the health endpoints.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from litestar import Litestar, MediaType, get
from litestar.di import Provide
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Schema,
    SecurityScheme,
    Tag,
)
from litestar.response import Response
from litestar.static_files import create_static_files_router
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import telemetry
from service.logs import AccessLog
from service.migrate import status
from service.rest import problems
from service.rest.clusters import ClusterController, TemplateController
from service.rest.guard import auth_guard
from service.rest.paths import PoolPaths, RequestIds
from service.rest.routes import AllocationController, PoolController, QueryController
from service.rest.tokens import TokenController

if TYPE_CHECKING:
    from litestar.types import ASGIApp

    from service.app import Resources

__all__ = ["build_http_app"]

_UI_ASSETS: Final = "/schema/assets"
_DESCRIPTION: Final = """\
IP address management for IPv6-first Kubernetes fleets: pools hand out non-overlapping
prefixes to owners (`node/worker-7`, `cluster/eu1-prod`, ...), with their history.

Errors are RFC 9457 problem details (`application/problem+json`): `type`
`urn:kipam:problem:<kind>`, the HTTP status from kipam's one table, `detail`, and the facts
a program needs (`field`, `conflicts`, `pool`, `largest_free`). Pool names contain `/`
and may be written plain in paths (`/v1/pools/eu1-prod/pod/usage`). Lists, lookup and usage
answer an aligned text table with `?format=text` or `Accept: text/plain`.
"""


def _swagger_ui_assets() -> Path:
    """Swagger UI's files in the swagger-ui-py wheel (found, not imported: it pulls in jinja)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a dependency
        raise RuntimeError("the swagger-ui-py package is missing; reinstall kipam")
    return Path(spec.submodule_search_locations[0]) / "static"


def build_http_app(res: Resources) -> ASGIApp:
    """The HTTP application over opened resources (the ASGI app uvicorn runs)."""

    @get("/healthz", sync_to_thread=False, include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", include_in_schema=False)
    async def readyz() -> Response[dict[str, Any]]:
        database_up = await res.db.ping()
        migrations: dict[str, object] = {"current": False}
        if database_up:
            try:
                async with res.db.connection() as conn:
                    found = await status(conn)
                migrations = {"current": found.current, "pending": list(found.pending)}
            except Exception:  # noqa: BLE001 - readiness reports, never raises
                database_up = False
        ready = database_up and bool(migrations["current"])
        body = {
            "status": "ready" if ready else "not ready",
            "database": {"up": database_up, "kind": res.database},
            "migrations": migrations,
            "locks": res.locks.status(),
        }
        return Response(body, status_code=200 if ready else 503)

    registry = res.metrics.registry

    # On the event loop, not in a thread: the collectors read the engines, which only the
    # loop changes (a few microseconds per pool).
    @get("/metrics", sync_to_thread=False, include_in_schema=False)
    def metrics() -> Response[bytes]:
        # As a header: given as the media type, Litestar would append a second charset.
        return Response(
            generate_latest(registry),
            media_type=MediaType.TEXT,
            headers={"content-type": CONTENT_TYPE_LATEST},
        )

    openapi = OpenAPIConfig(
        title="kipam",
        version="1",
        description=_DESCRIPTION,
        path="/schema",
        # Every /v1 operation takes the token (when the server requires one; see README,
        # "Security"); the Swagger UI's Authorize button sends it.
        components=Components(
            security_schemes={
                "token": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="kipam_<key id>_<secret>",
                    description="An API token (`kipam token create`).",
                )
            }
        ),
        security=[{"token": []}],
        tags=[
            Tag(name="pools", description="Named CIDRs and what hangs off one."),
            Tag(name="allocations", description="Prefixes held by owners."),
            Tag(name="queries", description="Who holds an address; what happened."),
            Tag(
                name="clusters",
                description="Cluster plans and what their nodes, Services "
                "and egress gateways hold.",
            ),
            Tag(name="tokens", description="API tokens (admin)."),
        ],
        render_plugins=[
            SwaggerRenderPlugin(
                path=["/", "/swagger"],
                js_url=f"{_UI_ASSETS}/swagger-ui-bundle.js",
                css_url=f"{_UI_ASSETS}/swagger-ui.css",
                standalone_preset_js_url=f"{_UI_ASSETS}/swagger-ui-standalone-preset.js",
                favicon="",  # Litestar's default is fetched from a CDN
            ),
            JsonRenderPlugin(),
        ],
    )
    app = Litestar(
        route_handlers=[
            healthz,
            readyz,
            metrics,
            PoolController,
            AllocationController,
            QueryController,
            ClusterController,
            TemplateController,
            TokenController,
            create_static_files_router(
                path=_UI_ASSETS,
                directories=[_swagger_ui_assets()],
                include_in_schema=False,
            ),
        ],
        dependencies={
            "kipam": Provide(lambda: res.kipam, sync_to_thread=False),
            "auth": Provide(lambda: res.auth, sync_to_thread=False),
        },
        guards=[auth_guard(res)],
        request_max_body_size=res.settings.max_message_bytes,
        exception_handlers={Exception: problems.handle},
        openapi_config=openapi,
        logging_config=None,
    )
    _document_text_tables(app)
    # Outermost the tracing middleware (when tracing is on), so the request's log line
    # carries its trace id; then the log line, which reads the request id RequestIds sets.
    logged: ASGIApp = AccessLog(RequestIds(PoolPaths(app)))  # type: ignore[assignment] # plain dicts
    return telemetry.wrap_asgi(logged)


def _document_text_tables(app: Litestar) -> None:
    """Declare the ``text/plain`` answer of every operation that takes ``format``.

    Litestar documents one media type per response; the aligned tables are the second.
    """
    for item in (app.openapi_schema.paths or {}).values():
        for operation in (item.get, item.post, item.delete):
            if operation is None or not any(
                getattr(p, "name", None) == "format" for p in operation.parameters or ()
            ):
                continue
            ok = (operation.responses or {}).get("200")
            if isinstance(ok, OpenAPIResponse) and ok.content is not None:
                ok.content["text/plain"] = OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, description="An aligned table.")
                )
