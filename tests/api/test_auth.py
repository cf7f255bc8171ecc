"""Authentication and authorization on both transports, against a real server and database.

Every operation of both transports is called without a token, with a revoked and an expired
one, with a read token and with an allocate token limited to ``eu1-prod/*``: each refusal
has its status (401/UNAUTHENTICATED, 403/PERMISSION_DENIED) and writes nothing. Tests check
that the tables below name every RPC and every REST operation, so a new one cannot slip in
unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.auth import Scope, Tokens, rule_of
from service.client import KipamClient
from service.clusters import EgressIdentity
from service.errors import RateLimitedError
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import pool_pb2 as ppb
from tests.api.conftest import serving, serving_http

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from google.protobuf.message import Message

    from service.config import Settings
    from service.grpc.server import GrpcServer
    from service.store import Database

pytestmark = [pytest.mark.integration, pytest.mark.api]

SITE: Final = "fd3c:9e12::/32"
PATTERN: Final = "eu1-prod/*"


class World(NamedTuple):
    """A secured replica with pools, a cluster, allocations and tokens of every kind."""

    server: GrpcServer
    url: str
    db: Database
    tokens: dict[str, str]  # token name -> secret text
    inside: int  # an allocation in eu1-prod/lab (the controller's patterns match)
    outside: int  # an allocation in other (they do not)


@pytest_asyncio.fixture(name="world", loop_scope="session")
async def _world(db: Database, settings: Settings, clean: None) -> AsyncIterator[World]:
    _ = clean
    secured = dataclasses.replace(settings, auth="required", auth_cache_s=0.0, rate_limit=0.0)
    async with serving(db, secured) as server:
        kipam = server.res.kipam
        await kipam.create_pool("site", cidr=SITE)
        await kipam.clusters.plan("eu1-prod", parent="site")
        await kipam.clusters.plan("us2-prod", parent="site")
        await kipam.create_pool("eu1-prod/lab", cidr="fd3e::/48")
        await kipam.create_pool("other", cidr="fd3d::/48")
        inside, _ = await kipam.allocate("eu1-prod/lab", owner="node/a", length=64)
        outside, _ = await kipam.allocate("other", owner="node/b", length=64)
        await kipam.clusters.create_template("small", overrides={"node_prefix_length": "80"})
        tokens = Tokens(db)
        made: dict[str, str] = {}
        for name, scope, pools in (
            ("root", Scope.ADMIN, ()),
            ("reader", Scope.READ, ()),
            ("ctl", Scope.ALLOCATE, (PATTERN,)),
            ("gone", Scope.ADMIN, ()),
            ("old", Scope.ADMIN, ()),
        ):
            _, made[name] = await tokens.create(name, scope, pools=pools, created_by="test")
        await tokens.revoke("gone")
        await db.fetch("UPDATE tokens SET expires_at = now() - interval '1 s' WHERE name = 'old'")
        async with serving_http(server) as url:
            yield World(server, url, db, made, inside.id, outside.id)


# -- every operation, with a request that names its target -----------------------------------

_NOW: Final = timestamp_pb2.Timestamp(seconds=1_700_000_000)


def _grpc_calls(inside: int, outside: int) -> list[tuple[str, str, Message, bool]]:
    """(service, method, request, whether the eu1-prod/* controller's pools cover it)."""
    pool, alloc, cluster = (
        "kipam.v1.PoolService",
        "kipam.v1.AllocationService",
        ("kipam.v1.ClusterService"),
    )
    identity = cpb.EgressIdentity(namespace="ns", labels={"app": "x"})
    return [
        (pool, "CreatePool", ppb.CreatePoolRequest(name="eu1-prod/new", cidr="fd3f::/48"), False),
        (pool, "DeletePool", ppb.DeletePoolRequest(name="eu1-prod/lab"), False),
        (pool, "GetPool", ppb.GetPoolRequest(name="eu1-prod/lab"), True),
        (pool, "GetPool", ppb.GetPoolRequest(name="other"), False),
        (pool, "ListPools", ppb.ListPoolsRequest(), False),
        (pool, "GetPoolUsage", ppb.GetPoolUsageRequest(name="other"), False),
        (pool, "ListAvailablePrefixes", ppb.ListAvailablePrefixesRequest(name="other"), False),
        (alloc, "AllocatePrefix", apb.AllocatePrefixRequest(pool="other", owner="node/x"), False),
        (
            alloc,
            "AllocatePrefixes",
            apb.AllocatePrefixesRequest(pool="other", requests=[apb.PrefixRequest(owner="node/x")]),
            False,
        ),
        (alloc, "ReleasePrefix", apb.ReleasePrefixRequest(id=outside), False),
        (alloc, "GetAllocation", apb.GetAllocationRequest(id=outside), False),
        (alloc, "GetAllocation", apb.GetAllocationRequest(id=inside), True),
        (alloc, "ListAllocations", apb.ListAllocationsRequest(), False),
        (alloc, "ListAllocations", apb.ListAllocationsRequest(pool="eu1-prod/lab"), True),
        (alloc, "LookupAddress", apb.LookupAddressRequest(address="fd3d::1", at=_NOW), False),
        (alloc, "ListChanges", apb.ListChangesRequest(pool="other"), False),
        (alloc, "ListChanges", apb.ListChangesRequest(), False),
        (alloc, "WatchAllocations", apb.WatchAllocationsRequest(pool="other"), False),
        (
            cluster,
            "PlanCluster",
            cpb.PlanClusterRequest(name="eu1-prod", parent_pool="site"),
            False,
        ),
        (cluster, "GetCluster", cpb.GetClusterRequest(name="us2-prod"), False),
        (cluster, "GetCluster", cpb.GetClusterRequest(name="eu1-prod"), True),
        (cluster, "ListClusters", cpb.ListClustersRequest(), False),
        (
            cluster,
            "RenderCluster",
            cpb.RenderClusterRequest(name="us2-prod", target="cilium-values"),
            False,
        ),
        (cluster, "DeleteCluster", cpb.DeleteClusterRequest(name="eu1-prod"), False),
        (
            cluster,
            "AllocateNodePrefix",
            cpb.AllocateNodePrefixRequest(cluster="us2-prod", node="n1"),
            False,
        ),
        (
            cluster,
            "ReleaseNodePrefix",
            cpb.ReleaseNodePrefixRequest(cluster="us2-prod", node="n1"),
            False,
        ),
        (
            cluster,
            "AllocateServiceAddress",
            cpb.AllocateServiceAddressRequest(cluster="us2-prod", namespace="ns", service="s"),
            False,
        ),
        (
            cluster,
            "ReleaseServiceAddress",
            cpb.ReleaseServiceAddressRequest(cluster="us2-prod", namespace="ns", service="s"),
            False,
        ),
        (
            cluster,
            "AllocateEgressAddress",
            cpb.AllocateEgressAddressRequest(cluster="us2-prod", identity=identity),
            False,
        ),
        (
            cluster,
            "ReleaseEgressAddress",
            cpb.ReleaseEgressAddressRequest(cluster="us2-prod", identity=identity),
            False,
        ),
        (cluster, "CreateTemplate", cpb.CreateTemplateRequest(name="big"), False),
        (cluster, "GetTemplate", cpb.GetTemplateRequest(name="small"), True),
        (cluster, "ListTemplates", cpb.ListTemplatesRequest(), True),
        (cluster, "DeleteTemplate", cpb.DeleteTemplateRequest(name="small"), False),
    ]


def _rest_calls(inside: int, outside: int) -> list[tuple[str, str, str, Any, bool]]:
    """(operation id, method, path, JSON body, whether the controller's pools cover it)."""
    return [
        ("CreatePool", "POST", "/v1/pools", {"name": "x", "cidr": "fd3f::/48"}, False),
        ("ListPools", "GET", "/v1/pools", None, False),
        ("GetPool", "GET", "/v1/pools/other", None, False),
        ("GetPool", "GET", "/v1/pools/eu1-prod/lab", None, True),
        ("DeletePool", "DELETE", "/v1/pools/eu1-prod/lab", None, False),
        ("GetPoolUsage", "GET", "/v1/pools/other/usage", None, False),
        ("ListAvailablePrefixes", "GET", "/v1/pools/other/available", None, False),
        ("AllocatePrefix", "POST", "/v1/pools/other/allocations", {"owner": "node/x"}, False),
        ("ListPoolAllocations", "GET", "/v1/pools/other/allocations", None, False),
        ("ListPoolAllocations", "GET", "/v1/pools/eu1-prod/lab/allocations", None, True),
        ("ListAllocations", "GET", "/v1/allocations", None, False),
        ("ListAllocations", "GET", "/v1/allocations?pool=other", None, False),
        ("GetAllocation", "GET", f"/v1/allocations/{outside}", None, False),
        ("GetAllocation", "GET", f"/v1/allocations/{inside}", None, True),
        ("ReleasePrefix", "DELETE", f"/v1/allocations/{outside}", None, False),
        ("LookupAddress", "GET", "/v1/lookup/fd3d::1", None, False),
        ("ListChanges", "GET", "/v1/history", None, False),
        ("ListChanges", "GET", "/v1/history?pool=eu1-prod/lab", None, True),
        ("PlanCluster", "POST", "/v1/clusters", {"name": "x", "parent_pool": "site"}, False),
        ("ListClusters", "GET", "/v1/clusters", None, False),
        ("GetCluster", "GET", "/v1/clusters/us2-prod", None, False),
        ("GetCluster", "GET", "/v1/clusters/eu1-prod", None, True),
        ("DeleteCluster", "DELETE", "/v1/clusters/eu1-prod", None, False),
        ("RenderCluster", "GET", "/v1/clusters/us2-prod/render/cilium-values", None, False),
        ("AllocateNodePrefix", "PUT", "/v1/clusters/us2-prod/nodes/n1", None, False),
        ("ReleaseNodePrefix", "DELETE", "/v1/clusters/us2-prod/nodes/n1", None, False),
        (
            "AllocateServiceAddress",
            "PUT",
            "/v1/clusters/us2-prod/services/ns/s",
            None,
            False,
        ),
        (
            "ReleaseServiceAddress",
            "DELETE",
            "/v1/clusters/us2-prod/services/ns/s",
            None,
            False,
        ),
        (
            "AllocateEgressAddress",
            "POST",
            "/v1/clusters/us2-prod/egress",
            {"namespace": "ns", "labels": {"app": "x"}},
            False,
        ),
        ("ReleaseEgressAddress", "DELETE", "/v1/clusters/us2-prod/egress/ns?app=x", None, False),
        ("ListTemplates", "GET", "/v1/templates", None, True),
        ("GetTemplate", "GET", "/v1/templates/small", None, True),
        ("CreateTemplate", "POST", "/v1/templates", {"name": "big"}, False),
        ("DeleteTemplate", "DELETE", "/v1/templates/small", None, False),
        ("CreateToken", "POST", "/v1/tokens", {"name": "x", "scope": "read"}, False),
        ("ListTokens", "GET", "/v1/tokens", None, False),
        ("RevokeToken", "DELETE", "/v1/tokens/reader", None, False),
    ]


def _expected(token: str | None, operation: str, covered: bool) -> int | None:
    """The HTTP status a token gets for an operation: 401, 403, or None (allowed)."""
    if token in {None, "gone", "old"}:
        return 401
    scope = rule_of(operation).scope
    if token == "reader":  # noqa: S105 - a token's name
        return None if scope is Scope.READ else 403
    if token == "ctl":  # noqa: S105 - a token's name
        return None if scope.rank <= Scope.ALLOCATE.rank and covered else 403
    return None


_CODES: Final = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}
_REFUSERS: Final = (None, "gone", "old", "reader", "ctl")


async def _state(db: Database) -> tuple[object, ...]:
    """Everything a refused call must leave as it was."""
    row = await db.fetchrow(
        """
        SELECT (SELECT coalesce(max(revision), 0) FROM changes) AS revision,
               (SELECT count(*) FROM changes) AS changes,
               (SELECT count(*) FROM pools WHERE deleted_at IS NULL) AS pools,
               (SELECT count(*) FROM allocations WHERE state = 'active') AS active,
               (SELECT count(*) FROM clusters WHERE deleted_at IS NULL) AS clusters,
               (SELECT count(*) FROM cluster_templates) AS templates,
               (SELECT count(*) FROM tokens WHERE revoked_at IS NULL) AS tokens
        """
    )
    assert row is not None
    return tuple(row.values())


def _metadata(world: World, token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {world.tokens[token]}"),)


async def _grpc_code(
    channel: grpc.aio.Channel, service: str, method: str, request: Message, meta: Any
) -> grpc.StatusCode:
    path = f"/{service}/{method}"
    try:
        if method == "WatchAllocations":
            stream = channel.unary_stream(path, request_serializer=type(request).SerializeToString)(
                request, metadata=meta, timeout=5
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for _ in stream:
                        break
            stream.cancel()
            return grpc.StatusCode.OK
        await channel.unary_unary(path, request_serializer=type(request).SerializeToString)(
            request, metadata=meta, timeout=10
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_rpc_refuses_callers_without_the_right_token(world: World) -> None:
    """401 without, revoked or expired; 403 for a read token writing or a pool outside."""
    before = await _state(world.db)
    calls = _grpc_calls(world.inside, world.outside)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{world.server.port}") as channel:
        for service, method, request, covered in calls:
            for token in _REFUSERS:
                expected = _expected(token, method, covered)
                if expected is None:
                    continue
                code = await _grpc_code(channel, service, method, request, _metadata(world, token))
                assert code == _CODES[expected], (method, token, code)
                assert await _state(world.db) == before, (method, token)


async def test_every_rest_operation_refuses_callers_without_the_right_token(world: World) -> None:
    """The same matrix over REST: 401 with WWW-Authenticate, 403, problem JSON, no change."""
    before = await _state(world.db)
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as http:
        for operation, method, path, body, covered in _rest_calls(world.inside, world.outside):
            for token in _REFUSERS:
                expected = _expected(token, operation, covered)
                if expected is None:
                    continue
                headers = dict(_metadata(world, token))
                response = await http.request(method, path, json=body, headers=headers)
                assert response.status_code == expected, (operation, token, response.text)
                assert response.headers["content-type"] == "application/problem+json"
                problem = response.json()
                assert problem["kind"] == ("unauthenticated" if expected == 401 else "forbidden")
                if expected == 401:
                    assert response.headers["www-authenticate"].startswith("Bearer")
                assert await _state(world.db) == before, (operation, token)


async def test_the_tables_name_every_operation(world: World) -> None:
    """Every RPC and every REST operation is in the matrix and has a rule of its own."""
    from service.auth import RULES  # noqa: PLC0415

    rpcs = {
        m.name
        for module in (apb, cpb, ppb)
        for s in module.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    assert {m for _, m, _, _ in _grpc_calls(1, 2)} == rpcs
    async with httpx.AsyncClient(base_url=world.url) as http:
        schema = (await http.get("/schema/openapi.json")).json()
    rest = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    assert {op for op, *_ in _rest_calls(1, 2)} == rest
    # The document says how: a bearer token, on every operation.
    assert schema["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    assert schema["security"] == [{"token": []}]
    assert rpcs | rest == set(RULES)


async def test_allowed_tokens_work_and_are_the_actor(world: World) -> None:
    """The controller allocates in its pools and its cluster; the history names it."""
    ctl = _metadata(world, "ctl")
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as http:
        made = await http.post(
            "/v1/pools/eu1-prod/lab/allocations",
            json={"owner": "node/rest", "prefix_length": 64},
            headers=dict(ctl),
        )
        assert made.status_code == 201, made.text
        node = await http.put("/v1/clusters/eu1-prod/nodes/n1", headers=dict(ctl))
        assert node.status_code == 200, node.text
        released = await http.delete(f"/v1/allocations/{world.inside}", headers=dict(ctl))
        assert released.status_code == 200, released.text
        read = await http.get("/v1/pools/other", headers=dict(_metadata(world, "reader")))
        assert read.status_code == 200, read.text
        history = await http.get("/v1/history", params={"pool": "eu1-prod/lab"}, headers=dict(ctl))
        assert history.status_code == 200, history.text
    actors = {c["actor"] for c in history.json()["items"] if c["owner"] == "node/rest"}
    assert actors == {"ctl"}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{world.server.port}") as channel:
        allocate = channel.unary_unary(
            "/kipam.v1.AllocationService/AllocatePrefix",
            request_serializer=apb.AllocatePrefixRequest.SerializeToString,
            response_deserializer=apb.AllocatePrefixResponse.FromString,
        )
        answer = await allocate(
            apb.AllocatePrefixRequest(pool="eu1-prod/lab", owner="node/grpc", prefix_length=64),
            metadata=ctl,
        )
    page = await world.server.res.kipam.history(pool="eu1-prod/lab", limit=100)
    grpc_changes = [c for c in page.items if c.allocation_id == answer.allocation.id]
    assert [c.actor for c in grpc_changes] == ["ctl"]
    held = await world.server.res.kipam.clusters.allocate_egress(
        "eu1-prod", EgressIdentity("ns", {"app": "x"})
    )
    assert held.owner.startswith("egress/")


async def test_revocation_through_the_api_takes_effect_at_once(world: World) -> None:
    """An admin revokes the reader over REST; its next call is 401 on both transports."""
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as http:
        reader = dict(_metadata(world, "reader"))
        assert (await http.get("/v1/pools", headers=reader)).status_code == 200
        revoked = await http.delete("/v1/tokens/reader", headers=dict(_metadata(world, "root")))
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["state"] == "revoked"
        refused = await http.get("/v1/pools", headers=reader)
        assert refused.status_code == 401
        assert "revoked" in refused.json()["detail"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{world.server.port}") as channel:
        code = await _grpc_code(
            channel,
            "kipam.v1.PoolService",
            "ListPools",
            ppb.ListPoolsRequest(),
            _metadata(world, "reader"),
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_tokens_over_rest(world: World) -> None:
    """Create (secret shown once), list (never a secret), use, expire bounds, bad input."""
    admin = dict(_metadata(world, "root"))
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as http:
        made = await http.post(
            "/v1/tokens",
            json={"name": "eu1-ctl", "scope": "allocate", "pools": [PATTERN], "expires": "90d"},
            headers=admin,
        )
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["token"].startswith("kipam_")
        assert body["created_by"] == "root"
        assert body["pools"] == [PATTERN]
        expires = dt.datetime.fromisoformat(body["expires_at"])
        assert dt.timedelta(days=89) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=90)
        again = await http.post(
            "/v1/tokens", json={"name": "eu1-ctl", "scope": "read"}, headers=admin
        )
        assert again.status_code == 409
        listed = await http.get("/v1/tokens", headers=admin)
        assert "kipam_" not in listed.text
        assert "eu1-ctl" in {t["name"] for t in listed.json()["items"]}
        use = await http.get(
            "/v1/pools/eu1-prod/lab", headers={"authorization": f"Bearer {body['token']}"}
        )
        assert use.status_code == 200
        listed = await http.get("/v1/tokens", headers=admin)
        used = {t["name"]: t["last_used_at"] for t in listed.json()["items"]}
        assert used["eu1-ctl"] is not None  # recorded at its first use
        for bad in (
            {"name": "x", "scope": "admin", "pools": ["a/*"]},
            {"name": "x", "scope": "read", "expires": "forever"},
            {"name": "x", "scope": "read", "expires": "0s"},
            {"name": "bad name", "scope": "read"},
            {"name": "x", "scope": "root"},
            {"name": "x", "scope": "read", "pools": ["with space"]},
        ):
            refused = await http.post("/v1/tokens", json=bad, headers=admin)
            assert refused.status_code == 422, (bad, refused.text)
    stored = await world.db.fetch("SELECT salt, hash FROM tokens WHERE name = 'eu1-ctl'")
    assert body["token"].encode() not in bytes(stored[0]["hash"]) + bytes(stored[0]["salt"])


@pytest.mark.parametrize(
    "value",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer kipam_",
        "Bearer kipam_0123456789abcdef_" + "A" * 43,  # well formed, unknown
        "Bearer " + "x" * 10_000,
        "bearer kipam_zz_zz",
    ],
)
async def test_malformed_or_unknown_tokens_are_401(world: World, value: str) -> None:
    """Never a 500: every malformed Authorization value is 401."""
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as http:
        response = await http.get("/v1/pools", headers={"authorization": value})
    assert response.status_code == 401, response.text


async def test_health_metrics_and_the_api_document_need_no_token(world: World) -> None:
    """Probes and scrapers carry no token."""
    async with httpx.AsyncClient(base_url=world.url, timeout=10) as http:
        for path in ("/healthz", "/readyz", "/metrics", "/schema/openapi.json"):
            assert (await http.get(path)).status_code == 200, path


async def test_a_token_over_its_rate_is_told_when_to_retry(
    db: Database, settings: Settings, clean: None
) -> None:
    """429 with Retry-After on REST; RESOURCE_EXHAUSTED with RetryInfo on gRPC."""
    _ = clean
    limited = dataclasses.replace(
        settings, auth="required", auth_cache_s=60.0, rate_limit=0.5, rate_burst=2
    )
    async with serving(db, limited) as server, serving_http(server) as url:
        _, text = await Tokens(db).create("busy", Scope.READ, created_by="test")
        headers = {"authorization": f"Bearer {text}"}
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            statuses = [(await http.get("/v1/pools", headers=headers)) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert int(statuses[2].headers["retry-after"]) >= 1
        assert statuses[2].json()["kind"] == "rate_limited"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary(
                "/kipam.v1.PoolService/ListPools",
                request_serializer=ppb.ListPoolsRequest.SerializeToString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(ppb.ListPoolsRequest(), metadata=tuple(headers.items()))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(refused.value)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
        assert retry.retry_delay.seconds + retry.retry_delay.nanos > 0
        async with KipamClient(f"127.0.0.1:{server.port}", token=text) as client:
            with pytest.raises(RateLimitedError) as typed:
                await client.list_pools()
        assert typed.value.retry_after_s > 0
