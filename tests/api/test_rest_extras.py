"""REST beyond the scenario table: names with '/', pages, text tables, keys, the schema."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from service.app import use_cases
from service.rest.app import build_http_app
from service.store import Database
from tests.conftest import drop_database, migrated_database

if TYPE_CHECKING:
    from service.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.api]

ROOT = Path(__file__).resolve().parents[2]
SITE = {"default_length": 64, "quarantine_seconds": 0}


async def _pool(http: httpx.AsyncClient, name: str, **body: object) -> dict[str, object]:
    response = await http.post("/v1/pools", json={"name": name, **body})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_pool_names_with_slashes_work_plain_and_encoded(http: httpx.AsyncClient) -> None:
    """`/v1/pools/eu1-prod/pod/usage` and `eu1-prod%2Fpod` both reach pool eu1-prod/pod."""
    await _pool(http, "eu1-prod", cidr="fd12:3456:789a::/48", policy=SITE)
    await _pool(http, "eu1-prod/pod", parent="eu1-prod", prefix_length=52, role="pod", policy=SITE)
    plain = await http.post("/v1/pools/eu1-prod/pod/allocations", json={"owner": "node/a"})
    assert plain.status_code == 201, plain.text
    assert plain.json()["pool"] == "eu1-prod/pod"
    for path in ("/v1/pools/eu1-prod/pod", "/v1/pools/eu1-prod%2Fpod"):
        assert (await http.get(path)).json()["name"] == "eu1-prod/pod"
    usage = (await http.get("/v1/pools/eu1-prod/pod/usage", params={"length": 64})).json()
    assert (usage["allocations"], usage["free_blocks"]) == (1, str(2**12 - 1))
    assert usage["utilization_percent"] == pytest.approx(100 / 2**12, abs=1e-4)
    missing = await http.get("/v1/pools/eu1-prod/nope/usage")
    assert missing.status_code == 404
    assert missing.json()["instance"] == "/v1/pools/eu1-prod/nope/usage"


async def test_pages_link_the_next_one(http: httpx.AsyncClient) -> None:
    """Keyset pages: `next` is a URL that keeps the filters and moves `after` on."""
    await _pool(http, "p", cidr="fd12:3456:789a::/48", policy=SITE)
    for n in range(5):
        await http.post("/v1/pools/p/allocations", json={"owner": f"node/n{n}"})
    seen: list[str] = []
    url: str | None = "/v1/pools/p/allocations?limit=2&state=active"
    while url is not None:
        page = (await http.get(url)).json()
        seen += [a["owner"] for a in page["items"]]
        url = page["next"]
        assert url is None or ("state=active" in url and url.startswith("/v1/pools/p/"))
    assert seen == [f"node/n{n}" for n in range(5)]


async def test_text_tables_for_people(http: httpx.AsyncClient) -> None:
    """Lists and lookup answer an aligned table for ?format=text or Accept: text/plain."""
    await _pool(http, "p", cidr="fd12:3456:789a::/48", policy=SITE, labels={"site": "eu1"})
    await http.post("/v1/pools/p/allocations", json={"owner": "node/worker-1"})
    by_query = await http.get("/v1/lookup/fd12:3456:789a::1", params={"format": "text"})
    by_accept = await http.get("/v1/lookup/fd12:3456:789a::1", headers={"accept": "text/plain"})
    assert by_query.headers["content-type"].startswith("text/plain")
    assert by_query.text == by_accept.text
    header, row = by_query.text.splitlines()
    assert header.split() == ["ID", "POOL", "PREFIX", "OWNER", "STATE", "FROM", "UNTIL", "LABELS"]
    assert row.split()[1:5] == ["p", "fd12:3456:789a::/64", "node/worker-1", "active"]
    assert header.index("OWNER") == row.index("node/worker-1")  # aligned
    pools = (await http.get("/v1/pools", params={"format": "text"})).text
    assert re.search(
        r"^p\s+fd12:3456:789a::/48\s+container\s+-\s+default\s+site=eu1$", pools, re.MULTILINE
    )
    usage = (await http.get("/v1/pools/p/usage", params={"format": "text"})).text
    assert "largest free block" in usage
    assert "utilization" in usage


async def test_idempotency_key_header_on_allocate(http: httpx.AsyncClient) -> None:
    """The same Idempotency-Key answers the same allocation, 201 then 200."""
    await _pool(http, "p", cidr="fd12:3456:789a::/48", policy=SITE)
    first = await http.post(
        "/v1/pools/p/allocations", json={"owner": "node/a"}, headers={"Idempotency-Key": "k"}
    )
    again = await http.post(
        "/v1/pools/p/allocations", json={"owner": "node/a"}, headers={"Idempotency-Key": "k"}
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = await http.post(
        "/v1/pools/p/allocations", json={"owner": "node/b"}, headers={"Idempotency-Key": "k"}
    )
    assert other.status_code == 409


async def test_problems_name_the_field_and_the_conflict(http: httpx.AsyncClient) -> None:
    """422 names the wrong field (ours or the schema's); 409 lists the held prefix."""
    await _pool(http, "p", cidr="fd12:3456:789a::/48", policy=SITE)
    wrong = await http.post(
        "/v1/pools/p/allocations", json={"owner": "node/a", "prefix_length": 40}
    )
    assert (wrong.status_code, wrong.json()["field"]) == (422, "prefix_length")
    typed = await http.post("/v1/pools/p/allocations", json={"owner": 7})
    assert (typed.status_code, typed.json()["field"]) == (422, "owner")
    await http.post("/v1/pools/p/allocations", json={"owner": "node/a"})
    taken = await http.post(
        "/v1/pools/p/allocations", json={"owner": "node/b", "prefix": "fd12:3456:789a::/60"}
    )
    assert taken.status_code == 409
    assert taken.json()["conflicts"] == ["fd12:3456:789a::/64"]
    assert "Traceback" not in taken.text


async def test_openapi_and_proto_describe_the_same_operations(http: httpx.AsyncClient) -> None:
    """Every REST operation is an RPC and the other way round, except the documented few."""
    schema = (await http.get("/schema/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    rest = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    rpcs = {
        m.group(1)
        for proto in (ROOT / "proto" / "kipam" / "v1").glob("*.proto")
        for m in re.finditer(r"^\s*rpc (\w+)\(", proto.read_text(), re.MULTILINE)
    }
    rest_only = {
        "ListPoolAllocations": "ListAllocations with pool= (REST nests it under the pool too)",
        "CreateToken": "tokens are managed by admins over REST and by `kipam token` on the DB",
        "ListTokens": "(as CreateToken)",
        "RevokeToken": "(as CreateToken)",
    }
    grpc_only = {
        "AllocatePrefixes": "REST posts a batch to the same URL as one prefix (`requests`)",
        "WatchAllocations": "a server stream; REST reads the same history from /v1/history",
    }
    assert rest - rpcs == set(rest_only)
    assert rpcs - rest == set(grpc_only)


async def test_the_schema_ui_loads_without_a_cdn(http: httpx.AsyncClient) -> None:
    """/schema is an interactive Swagger UI whose scripts kipam serves itself."""
    page = (await http.get("/schema")).text
    scripts = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert scripts
    assert not [s for s in scripts if s.startswith("http")]
    for url in scripts:
        assert (await http.get(url)).status_code == 200, url


async def test_database_down_is_503_and_not_ready(server_dsn: str, settings: Settings) -> None:
    """With its database gone, the API answers 503 problems and /readyz says not ready."""
    async with migrated_database(server_dsn) as dsn:
        quick = dataclasses.replace(settings, statement_timeout_s=2.0)
        db = await Database.open(dsn, quick)
        try:
            async with (
                use_cases(quick, db) as res,
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=build_http_app(res)), base_url="http://kipam"
                ) as http,
            ):
                assert (await http.get("/readyz")).status_code == 200
                await drop_database(server_dsn, dsn)  # the database goes away under it
                down = await http.get("/v1/pools")
                assert down.status_code == 503
                assert down.headers["content-type"] == "application/problem+json"
                assert down.headers["retry-after"] == "1"
                assert down.json()["kind"] == "unavailable"
                assert (await http.get("/readyz")).status_code == 503
        finally:
            await db.close()


async def test_every_answer_carries_its_request_id(http: httpx.AsyncClient) -> None:
    """X-Request-ID: the caller's is echoed and recorded; one is made when none is sent."""
    await _pool(http, "p", cidr="fd12:3456:789a::/48", policy=SITE)
    made = await http.post(
        "/v1/pools/p/allocations", json={"owner": "node/a"}, headers={"x-request-id": "job-42"}
    )
    assert made.headers["x-request-id"] == "job-42"
    history = (await http.get("/v1/history", params={"pool": "p"})).json()["items"]
    assert history[-1]["request_id"] == "job-42"
    missing = await http.get("/v1/pools/nope")
    assert missing.status_code == 404
    assert len(missing.headers["x-request-id"]) == 32
    assert missing.json()["request_id"] == missing.headers["x-request-id"]
