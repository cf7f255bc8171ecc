"""Hostile input on both transports, against a real server and database.

No 500/INTERNAL (nor UNKNOWN), no traceback (in an answer or in the server's log), and a
refused call writes nothing:

* gRPC fuzz: every method of kipam.v1's three services gets requests Hypothesis builds from
  the method's descriptor (:mod:`tests.api.protogen`), with authentication off, then again
  with it required and a mix of tokens. ``KIPAM_HOSTILE_EXAMPLES`` bounds the requests per
  method (25 by default); generation is derandomized, so CI runs the same requests each time.
  REST's generated requests are schemathesis' (``test_schemathesis.py``).
* Bytes that are not the method's message (garbage, truncated, a string that is not UTF-8),
  and a message just over ``max_message_bytes``.
* SQL-injection-shaped text: refused where a field has rules (names, label keys and values),
  stored and answered verbatim where it is free text (an owner's name part, idempotency
  keys, request ids, a template's description).
* Over-long and non-UTF-8 input; IPv6 text edge cases; out-of-range times.

Cases covered elsewhere are not repeated: the MALFORMED tables of ``test_grpc.py`` and
``test_clusters_api.py`` (one refused request per field rule, injection in a cluster
override), the 5 MB gRPC message of ``test_grpc.py``, malformed tokens in ``test_auth.py``,
and prefix parsing itself in ``tests/engine/test_prefix.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, Phase, given, settings

from service.auth import Scope, Tokens, rule_of
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import pool_pb2 as ppb
from service.models import PoolPolicy
from tests.api.conftest import serving
from tests.api.protogen import messages, raw_field

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    import httpx
    from google.protobuf.descriptor import MethodDescriptor
    from google.protobuf.message import Message
    from hypothesis.strategies import SearchStrategy

    from service.config import Settings
    from service.grpc.server import GrpcServer
    from service.store import Database
    from service.usecases import Kipam

pytestmark = [pytest.mark.integration, pytest.mark.api]

T = TypeVar("T")

EXAMPLES: Final = int(os.environ.get("KIPAM_HOSTILE_EXAMPLES", "25"))
METHODS: Final = [
    method
    for module in (ppb, apb, cpb)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
# Codes that say the server failed, not the caller: never the answer to any input.
FAILED: Final = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
PROBLEM: Final = "application/problem+json"
INVALID: Final = grpc.StatusCode.INVALID_ARGUMENT
SITE: Final = "fd3c:9e12::/32"
BASE: Final = "fd00:1::/48"


# -- helpers ----------------------------------------------------------------------------------


def examples(strategy: SearchStrategy[T], count: int) -> list[T]:
    """``count`` values of ``strategy``, the same ones on every run (derandomized).

    The requests are drawn first and sent afterwards: Hypothesis' test functions are
    synchronous, the calls are not, and the fuzz reports every failing request rather than
    shrinking one.
    """
    drawn: list[T] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: T) -> None:
        drawn.append(value)

    collect()
    return drawn


async def _state(db: Database) -> tuple[object, ...]:
    """Everything a refused call must leave as it was."""
    row = await db.fetchrow(
        """
        SELECT (SELECT coalesce(max(revision), 0) FROM changes) AS revision,
               (SELECT count(*) FROM changes) AS changes,
               (SELECT count(*) FROM spaces) AS spaces,
               (SELECT count(*) FROM pools) AS pools,
               (SELECT count(*) FROM pools WHERE deleted_at IS NULL) AS live_pools,
               (SELECT count(*) FROM allocations) AS allocations,
               (SELECT count(*) FROM allocations WHERE state = 'active') AS active,
               (SELECT count(*) FROM clusters WHERE deleted_at IS NULL) AS clusters,
               (SELECT count(*) FROM cluster_templates) AS templates,
               (SELECT count(*) FROM tokens WHERE revoked_at IS NULL) AS tokens
        """
    )
    assert row is not None
    return tuple(row.values())


def _is_read(method: MethodDescriptor) -> bool:
    return rule_of(method.name).scope is Scope.READ


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was logged with a traceback: no handler failed, grpcio's neither."""
    failed = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info or "Traceback" in r.getMessage()
    ]
    assert not failed, "\n".join(failed)


class Answer(NamedTuple):
    """A call's status code and message."""

    code: grpc.StatusCode
    details: str


async def _call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message | bytes,
    metadata: Sequence[tuple[str, str]] = (),
) -> Answer:
    """Call ``method`` with a message (or raw bytes); a watch is read for a moment only."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    answer = GetMessageClass(method.output_type).FromString

    def serialize(message: Message | bytes) -> bytes:
        return message if isinstance(message, bytes) else message.SerializeToString()

    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=serialize, response_deserializer=answer
            )(request, metadata=metadata, timeout=10)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    async for _ in stream:
                        break
            stream.cancel()
        else:
            await channel.unary_unary(
                path, request_serializer=serialize, response_deserializer=answer
            )(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return Answer(exc.code(), exc.details() or "")
    return Answer(grpc.StatusCode.OK, "")


def _short(request: Message | bytes) -> str:
    text = repr(request) if isinstance(request, bytes) else str(request).replace("\n", " ")
    return text[:300]


async def _seed(kipam: Kipam, *, cluster: bool = False) -> None:
    """Pools and an allocation (and a cluster and a template) for requests to find."""
    await kipam.create_pool(
        "base", cidr=BASE, policy=PoolPolicy(default_length=64, quarantine_seconds=0)
    )
    await kipam.allocate("base", owner="node/a", length=64)
    await kipam.create_pool("site", cidr=SITE)
    if cluster:
        await kipam.clusters.plan("c1", parent="site")
        await kipam.clusters.create_template("small", overrides={"node_prefix_length": "80"})


async def _fuzz(
    channel: grpc.aio.Channel,
    db: Database,
    count: int,
    metadata: Sequence[Sequence[tuple[str, str]]] = ((),),
    *,
    secured: bool = False,
) -> tuple[list[str], dict[str, int]]:
    """Send ``count`` generated requests to every method; the broken invariants, and codes.

    Each request goes with the next of ``metadata`` in turn. A call that is refused, a read
    and a dry run must leave the database as it was; on a ``secured`` server a call without
    a token is UNAUTHENTICATED whatever it asks (it learns nothing, not even what is invalid).
    """
    failures: list[str] = []
    seen: dict[str, int] = {}
    turn = 0
    for method in METHODS:
        budget = min(count, 8) if method.server_streaming else count
        for request in examples(messages(method.input_type), budget):
            meta = metadata[turn % len(metadata)]
            turn += 1
            before = await _state(db)
            code, details = await _call(channel, method, request, meta)
            seen[code.name] = seen.get(code.name, 0) + 1
            where = f"{method.name} {code.name} {details[:200]!r} <- {_short(request)}"
            if code in FAILED or "Traceback" in details:
                failures.append(f"failed: {where}")
            if secured and not meta and code is not grpc.StatusCode.UNAUTHENTICATED:
                failures.append(f"let in: {where}")
            dry = bool(getattr(request, "dry_run", False))
            if (code is not grpc.StatusCode.OK or _is_read(method) or dry) and (
                await _state(db) != before
            ):
                failures.append(f"wrote: {where}")
    return failures, seen


# -- fixtures ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(name="seeded", loop_scope="session")
async def _seeded(server: GrpcServer) -> GrpcServer:
    await _seed(server.res.kipam)
    return server


@pytest_asyncio.fixture(name="channel", loop_scope="session")
async def _channel(seeded: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{seeded.port}") as channel:
        yield channel


# -- gRPC fuzz --------------------------------------------------------------------------------


async def test_fuzzed_requests_never_fail_the_server(
    channel: grpc.aio.Channel, server: GrpcServer, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Generated requests to every RPC: never INTERNAL/UNKNOWN; refusals and reads write nothing."""
    assert len(METHODS) >= 29
    await server.res.kipam.clusters.plan("c1", parent="site")
    await server.res.kipam.clusters.create_template("small", overrides={"node_prefix_length": "80"})
    failures, seen = await _fuzz(channel, db, EXAMPLES)
    assert not failures, "\n".join(failures)
    # The fuzz reaches past validation: some requests succeed, some find nothing.
    assert seen.get("OK", 0) > 0
    assert seen.get("NOT_FOUND", 0) > 0
    _no_tracebacks(caplog)


async def test_fuzzed_requests_with_authentication_required(
    db: Database, settings: Settings, clean: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The fuzz again with tokens required: none, garbage, read, pool-limited, admin."""
    _ = clean
    secured = dataclasses.replace(settings, auth="required", auth_cache_s=0.0, rate_limit=0.0)
    async with serving(db, secured) as server:
        await _seed(server.res.kipam, cluster=True)
        tokens = Tokens(db)
        metadata: list[Sequence[tuple[str, str]]] = [(), (("authorization", "Bearer kipam_x"),)]
        for name, scope, pools in (
            ("reader", Scope.READ, ()),
            ("ctl", Scope.ALLOCATE, ("base", "c1/*")),
            ("root", Scope.ADMIN, ()),
        ):
            _, secret = await tokens.create(name, scope, pools=pools, created_by="test")
            metadata.append((("authorization", f"Bearer {secret}"),))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            failures, seen = await _fuzz(channel, db, max(5, EXAMPLES // 2), metadata, secured=True)
    assert not failures, "\n".join(failures)
    assert seen.get("UNAUTHENTICATED", 0) > 0
    assert seen.get("PERMISSION_DENIED", 0) > 0
    assert seen.get("OK", 0) > 0
    _no_tracebacks(caplog)


# -- bytes that are not the message -----------------------------------------------------------

UNDECODABLE: Final = [
    pytest.param(b"\x0a\x05ab", id="truncated"),
    pytest.param(b"\x08" + b"\xff" * 10 + b"\x01", id="varint-too-long"),
    pytest.param(b"\x0b" * 200, id="unclosed-groups"),
    pytest.param(b"\x00", id="field-zero"),
    pytest.param(b"\x0c", id="stray-end-group"),
    pytest.param(b"\xff\xff\xff\xff", id="garbage"),
]


@pytest.mark.parametrize("payload", UNDECODABLE)
async def test_undecodable_requests_are_invalid_argument(
    channel: grpc.aio.Channel, db: Database, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    """Bytes no request message parses from: INVALID_ARGUMENT on every RPC, nothing logged.

    grpcio's aio server would answer UNKNOWN ("Unexpected <class DecodeError>") and log a
    traceback; kipam's error interceptor parses requests itself (service/grpc/errors.py).
    """
    before = await _state(db)
    for method in METHODS:
        code, details = await _call(channel, method, payload)
        assert code is INVALID, (method.name, code, details)
        assert "not a valid message" in details
        assert "class" not in details
    assert await _state(db) == before
    _no_tracebacks(caplog)


def _string_fields(method: MethodDescriptor) -> list[tuple[str, bytes]]:
    """(where, request bytes) with a string that is not UTF-8, at each place one can be."""
    out: list[tuple[str, bytes]] = []
    for field in method.input_type.fields:
        if field.type == field.TYPE_STRING:
            out.append((field.name, raw_field(field.number, b"\xc3\x28 not utf-8 \xff")))
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = raw_field(1, b"k\xfe") + raw_field(2, b"v")
            out.append((f"{field.name} key", raw_field(field.number, entry)))
        elif field.message_type is not None and field.message_type.name != "Timestamp":
            inner = next((f for f in field.message_type.fields if f.type == f.TYPE_STRING), None)
            if inner is not None:
                nested = raw_field(inner.number, b"\xed\xa0\x80")  # an encoded surrogate
                out.append((f"{field.name}.{inner.name}", raw_field(field.number, nested)))
    return out


async def test_strings_that_are_not_utf8_are_invalid_argument(
    channel: grpc.aio.Channel, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A string, map key or nested string of bad UTF-8 (written by hand): INVALID_ARGUMENT."""
    before = await _state(db)
    tried = 0
    for method in METHODS:
        for where, payload in _string_fields(method):
            code, details = await _call(channel, method, payload)
            assert code is INVALID, (method.name, where, code, details)
            assert "UTF-8" in details, details
            tried += 1
    assert tried > 40
    assert await _state(db) == before
    _no_tracebacks(caplog)


async def test_message_just_over_the_limit_is_resource_exhausted(
    channel: grpc.aio.Channel, seeded: GrpcServer, db: Database
) -> None:
    """One byte over ``max_message_bytes`` is refused by the transport; under it, by kipam."""
    limit = seeded.res.settings.max_message_bytes
    create = next(m for m in METHODS if m.name == "CreatePool")
    before = await _state(db)

    def name_of_size(size: int) -> bytes:
        head = raw_field(2, b"fd00:9::/48")
        body = size - len(head) - 1 - 4  # the tag, a length varint of 4 bytes
        message = head + raw_field(1, b"p" * body)
        assert len(message) == size
        return message

    over = await _call(channel, create, name_of_size(limit + 1))
    assert over.code is grpc.StatusCode.RESOURCE_EXHAUSTED, over
    under = await _call(channel, create, name_of_size(limit - 64))
    assert under.code is INVALID, under
    assert await _state(db) == before


# -- SQL-injection-shaped text ----------------------------------------------------------------

INJECTIONS: Final = (
    "'; DROP TABLE pools; --",
    '" OR 1=1 --',
    "$1",
    "%s",
    "\\x00",
    "\u2019; DROP TABLE allocations; --",
    "1'); DELETE FROM changes; --",
)
# An owner's name part is free text without whitespace: these are owners, stored verbatim.
OWNERS: Final = (
    "node/';DROP/**/TABLE/**/pools;--",
    'node/"OR"1"="1"--',
    "node/$1",
    "node/%s%n",
    "node/\\x00",
    "node/\u2019OR\u20181\u2019=\u20181",
    "node/{0}{owner}",
    "node/1');DELETE/**/FROM/**/changes;--",
)


async def test_injection_shaped_names_and_labels_are_refused(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, db: Database
) -> None:
    """Names, spaces, label keys and values have rules: 422/INVALID_ARGUMENT, nothing written."""
    pools = ppb.DESCRIPTOR.services_by_name["PoolService"].methods_by_name
    allocations = apb.DESCRIPTOR.services_by_name["AllocationService"].methods_by_name
    before = await _state(db)
    for text in INJECTIONS:
        grpc_cases: list[tuple[MethodDescriptor, Message]] = [
            (pools["CreatePool"], ppb.CreatePoolRequest(name=text, cidr="fd00:9::/48")),
            (pools["CreatePool"], ppb.CreatePoolRequest(name="p", cidr=text)),
            (
                pools["CreatePool"],
                ppb.CreatePoolRequest(name="p", cidr="fd00:9::/48", space=text),
            ),
            (
                pools["CreatePool"],
                ppb.CreatePoolRequest(name="p", cidr="fd00:9::/48", labels={"app": text}),
            ),
            (
                allocations["AllocatePrefix"],
                apb.AllocatePrefixRequest(pool="base", owner="node/b", labels={text: "x"}),
            ),
            (allocations["ListAllocations"], apb.ListAllocationsRequest(label_selector=text)),
            (allocations["LookupAddress"], apb.LookupAddressRequest(address=text)),
        ]
        if any(c.isspace() for c in text):  # else a valid owner: see the next test
            grpc_cases.append(
                (
                    allocations["AllocatePrefix"],
                    apb.AllocatePrefixRequest(pool="base", owner=f"node/{text}"),
                )
            )
        for method, request in grpc_cases:
            code, details = await _call(channel, method, request)
            assert code is INVALID, (method.name, text, code, details)
        rest_cases: list[tuple[str, str, object]] = [
            ("POST", "/v1/pools", {"name": text, "cidr": "fd00:9::/48"}),
            ("POST", "/v1/pools", {"name": "p", "cidr": "fd00:9::/48", "space": text}),
            ("POST", "/v1/pools", {"name": "p", "cidr": "fd00:9::/48", "labels": {"a": text}}),
            ("POST", "/v1/pools/base/allocations", {"owner": "node/b", "labels": {text: "x"}}),
            ("POST", "/v1/templates", {"name": text}),
            ("POST", "/v1/clusters", {"name": text, "parent_pool": "site"}),
        ]
        for verb, path, body in rest_cases:
            response = await http.request(verb, path, json=body)
            assert response.status_code == 422, (path, body, response.text)
            assert response.headers["content-type"] == PROBLEM
        for path, params in (
            ("/v1/allocations", {"selector": text}),
            ("/v1/pools", {"selector": text}),
            ("/v1/allocations", {"pool": text}),
        ):
            response = await http.get(path, params=params)
            assert response.status_code == 422, (path, params, response.text)
    assert await _state(db) == before


async def test_injection_shaped_free_text_is_stored_verbatim(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, db: Database
) -> None:
    """Owners, idempotency keys, request ids and descriptions come back exactly as sent."""
    allocate = apb.DESCRIPTOR.services_by_name["AllocationService"].methods_by_name
    stub_allocate = channel.unary_unary(
        "/kipam.v1.AllocationService/AllocatePrefix",
        request_serializer=apb.AllocatePrefixRequest.SerializeToString,
        response_deserializer=apb.AllocatePrefixResponse.FromString,
    )
    for n, owner in enumerate(OWNERS):
        key = INJECTIONS[n % len(INJECTIONS)] + f" #{n}"
        request_id = f"';DROP/**/TABLE/**/changes;--{n}"
        made = await stub_allocate(
            apb.AllocatePrefixRequest(pool="base", owner=owner, idempotency_key=key),
            metadata=(("x-request-id", request_id),),
        )
        assert (made.allocation.owner, made.allocation.idempotency_key) == (owner, key)
        again = await stub_allocate(
            apb.AllocatePrefixRequest(pool="base", owner=owner, idempotency_key=key)
        )
        assert (again.created, again.allocation.id) == (False, made.allocation.id)
        found = await http.get("/v1/allocations", params={"owner": owner})
        assert [a["id"] for a in found.json()["items"]] == [made.allocation.id], found.text
        rest = await http.post(
            "/v1/pools/base/allocations",
            json={"owner": owner + "-rest"},
            headers={"Idempotency-Key": f"{INJECTIONS[0]} rest #{n}", "x-request-id": request_id},
        )
        assert rest.status_code == 201, rest.text
        assert rest.json()["owner"] == owner + "-rest"
        assert rest.json()["idempotency_key"] == f"{INJECTIONS[0]} rest #{n}"
        assert rest.headers["x-request-id"] == request_id
        shown = await http.get(f"/v1/allocations/{rest.json()['id']}")
        assert shown.json()["owner"] == owner + "-rest"
    history = (await http.get("/v1/history", params={"pool": "base", "limit": 1000})).json()
    recorded = {(c["owner"], c["request_id"]) for c in history["items"]}
    for n, owner in enumerate(OWNERS):
        request_id = f"';DROP/**/TABLE/**/changes;--{n}"
        assert {(owner, request_id), (owner + "-rest", request_id)} <= recorded
    listed = await _call(
        channel, allocate["ListAllocations"], apb.ListAllocationsRequest(owner=OWNERS[0])
    )
    assert listed.code is grpc.StatusCode.OK

    description = " | ".join(INJECTIONS) + " \"quoted\" 'single' `back` \\ \n\t end"
    create = channel.unary_unary(
        "/kipam.v1.ClusterService/CreateTemplate",
        request_serializer=cpb.CreateTemplateRequest.SerializeToString,
        response_deserializer=cpb.CreateTemplateResponse.FromString,
    )
    made_template = await create(cpb.CreateTemplateRequest(name="t1", description=description))
    assert made_template.template.description == description
    rest_template = await http.post(
        "/v1/templates", json={"name": "t2", "description": description}
    )
    assert rest_template.status_code == 201, rest_template.text
    for name in ("t1", "t2"):
        assert (await http.get(f"/v1/templates/{name}")).json()["description"] == description
    # Every table is still there and holds what it held.
    assert (await http.get("/v1/pools")).status_code == 200
    row = await db.fetchrow("SELECT count(*) FROM cluster_templates WHERE name LIKE 't_'")
    assert row is not None
    assert row[0] == 2


@pytest.mark.parametrize(
    ("what", "text"),
    [("NUL", "a\x00b"), ("NUL alone", "\x00")],
)
async def test_text_postgresql_cannot_store_is_refused_clearly(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, db: Database, what: str, text: str
) -> None:
    """NUL is valid protobuf and JSON text that PostgreSQL cannot store: 422 naming the field."""
    _ = what
    before = await _state(db)
    allocate = apb.DESCRIPTOR.services_by_name["AllocationService"].methods_by_name
    template = cpb.DESCRIPTOR.services_by_name["ClusterService"].methods_by_name
    for method, request in (
        (
            allocate["AllocatePrefix"],
            apb.AllocatePrefixRequest(pool="base", owner="node/b", idempotency_key=text),
        ),
        (allocate["AllocatePrefix"], apb.AllocatePrefixRequest(pool="base", owner=f"node/{text}")),
        (template["CreateTemplate"], cpb.CreateTemplateRequest(name="t", description=text)),
    ):
        code, details = await _call(channel, method, request)
        assert code is INVALID, (method.name, code, details)
    for path, body in (
        ("/v1/pools/base/allocations", {"owner": f"node/{text}"}),
        ("/v1/templates", {"name": "t", "description": text}),
    ):
        response = await http.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["field"] in {"owner", "description"}, response.text
    assert await _state(db) == before


# -- over-long input --------------------------------------------------------------------------


async def test_over_long_input_is_refused(
    channel: grpc.aio.Channel,
    http: httpx.AsyncClient,
    db: Database,
    seeded: GrpcServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Huge names, owners, labels, keys, tokens and paths: 4xx naming the field, nothing written."""
    pools = ppb.DESCRIPTOR.services_by_name["PoolService"].methods_by_name
    allocations = apb.DESCRIPTOR.services_by_name["AllocationService"].methods_by_name
    clusters = cpb.DESCRIPTOR.services_by_name["ClusterService"].methods_by_name
    many = {f"k{i}": "v" for i in range(1000)}
    before = await _state(db)
    for method, request in (
        (pools["CreatePool"], ppb.CreatePoolRequest(name="p" * 10_000, cidr="fd00:9::/48")),
        (pools["CreatePool"], ppb.CreatePoolRequest(name="p", cidr="fd00:9::/48", labels=many)),
        (pools["GetPool"], ppb.GetPoolRequest(name="p" * 100_000)),
        (
            allocations["AllocatePrefix"],
            apb.AllocatePrefixRequest(pool="base", owner="node/" + "a" * 100_000),
        ),
        (
            allocations["AllocatePrefix"],
            apb.AllocatePrefixRequest(pool="base", owner="node/b", labels={"app": "v" * 64}),
        ),
        (
            allocations["AllocatePrefix"],
            apb.AllocatePrefixRequest(pool="base", owner="node/b", labels={"k" * 400: "v"}),
        ),
        (allocations["ListAllocations"], apb.ListAllocationsRequest(page_token="t" * 100_000)),
        (allocations["LookupAddress"], apb.LookupAddressRequest(address="1" * 100_000)),
        (clusters["CreateTemplate"], cpb.CreateTemplateRequest(name="t", description="d" * 1025)),
        (
            clusters["AllocateNodePrefix"],
            cpb.AllocateNodePrefixRequest(cluster="c" * 10_000, node="n"),
        ),
    ):
        code, details = await _call(channel, method, request)
        assert code is INVALID, (method.name, code, details[:200])
        assert len(details) < 2000, "the answer does not echo the whole input"

    for path, body in (
        ("/v1/pools", {"name": "p" * 10_000, "cidr": "fd00:9::/48"}),
        ("/v1/pools", {"name": "p", "cidr": "fd00:9::/48", "labels": many}),
        ("/v1/pools/base/allocations", {"owner": "node/" + "a" * 100_000}),
        ("/v1/pools/base/allocations", {"owner": "node/b", "labels": {"app": "v" * 64}}),
        ("/v1/templates", {"name": "t", "description": "d" * 1025}),
    ):
        response = await http.post(path, json=body)
        assert response.status_code == 422, (path, response.text[:300])
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["field"]

    limit = seeded.res.settings.max_message_bytes
    huge = json.dumps({"name": "p", "cidr": "fd00:9::/48", "labels": {"k": "v" * limit}})
    too_big = await http.post(
        "/v1/pools", content=huge, headers={"content-type": "application/json"}
    )
    assert too_big.status_code == 413, too_big.text[:300]
    assert too_big.headers["content-type"] == PROBLEM
    assert too_big.json()["status"] == 413

    for path in (
        "/v1/pools/" + "p" * 10_000,
        "/v1/pools/" + "p" * 10_000 + "/usage",
        "/v1/lookup/" + "1" * 10_000,
        "/v1/clusters/" + "c" * 10_000,
        "/v1/allocations/" + "9" * 10_000,
    ):
        response = await http.get(path)
        assert 400 <= response.status_code < 500, (path[:40], response.status_code)
        assert response.headers["content-type"] == PROBLEM, path[:40]
    for params in ({"selector": "a," * 4_000}, {"after": "x" * 10_000}, {"owner": "o" * 10_000}):
        response = await http.get("/v1/allocations", params=params)
        assert response.status_code in {200, 422}, (params.keys(), response.text[:300])
    long_id = await http.get("/v1/pools", headers={"x-request-id": "r" * 10_000})
    assert long_id.status_code == 200
    assert len(long_id.headers["x-request-id"]) == 32  # replaced, not echoed
    assert await _state(db) == before
    _no_tracebacks(caplog)


# -- non-UTF-8 over REST ----------------------------------------------------------------------


async def test_rest_input_that_is_not_utf8_is_a_4xx_problem(
    http: httpx.AsyncClient, seeded: GrpcServer, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Bodies, paths and queries of bytes that are not UTF-8: a 4xx problem, nothing written."""
    _ = seeded
    before = await _state(db)
    json_type = {"content-type": "application/json"}
    for body in (
        b'{"name": "\xff\xfe", "cidr": "fd00:9::/48"}',
        b'{"name": "p", "cidr": "fd00:9::/48", "labels": {"\xc3\x28": "v"}}',
        b"\xff\xfe{\x00}",
        '{"name": "p", "cidr": "fd00:9::/48"}'.encode("utf-16"),
        b'{"name": "p\\ud800", "cidr": "fd00:9::/48"}',  # a lone surrogate, escaped
        b'{"name": "p\\udc00x", "cidr": "fd00:9::/48"}',
    ):
        response = await http.post("/v1/pools", content=body, headers=json_type)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        assert response.headers["content-type"] == PROBLEM, body
    owner = await http.post(
        "/v1/pools/base/allocations", content=b'{"owner": "node/\xe9t\xe9"}', headers=json_type
    )
    assert 400 <= owner.status_code < 500, owner.text
    for path in (
        "/v1/pools/%FF%FE",
        "/v1/pools/%FF%FE/usage",
        "/v1/pools/base%C3%28/allocations",
        "/v1/lookup/%FF",
        "/v1/clusters/%FF%FE",
        "/v1/templates/%ED%A0%80",
        "/v1/allocations/%FF",
        "/v1/allocations?selector=%FF%FE",
        "/v1/allocations?owner=node/%FF",
        "/v1/history?prefix=%FF",
    ):
        response = await http.get(path)
        assert 400 <= response.status_code < 500 or response.status_code == 200, (path, response)
        if response.status_code != 200:
            assert response.headers["content-type"] == PROBLEM, path
    raw_header = await http.post(
        "/v1/pools/base/allocations",
        json={"owner": "node/hdr", "dry_run": True},
        headers=[(b"idempotency-key", b"\xff\xfe"), (b"x-request-id", b"\xff\xfe")],
    )
    assert raw_header.status_code in {200, 201, 422}, raw_header.text
    assert await _state(db) == before
    _no_tracebacks(caplog)


# -- IPv6 text --------------------------------------------------------------------------------


class Case(NamedTuple):
    """A text, and how a server answers it: the canonical text, or the words of a refusal."""

    text: str
    canonical: str | None
    words: str = ""


POOL_CIDRS: Final = [
    Case("FD3C:9E12::/32", "fd3c:9e12::/32"),
    Case("fd3c:0009:0e12::/48", "fd3c:9:e12::/48"),  # up to 4 hex digits a group (RFC 4291)
    Case("fd3c:9e13::c000:200/120", "fd3c:9e13::c000:200/120"),
    Case("fd3c:9e14::192.0.2.0/120", "fd3c:9e14::c000:200/120"),  # embedded IPv4 text
    Case("fd3c:09e12::/48", None, "At most 4 characters"),
    Case("fe80::1%eth0/64", None, "zone id"),
    Case("fe80::%1/64", None, "zone id"),
    Case("::ffff:192.0.2.0/120", None, "IPv4-mapped"),
    Case("64:ff9b::/96", None, "RFC 6052"),
    Case("::/0", None, "must never be allocated from"),
    Case("2001:db8::/129", None, "between 0 and 128"),
    Case("fd3c:9e12::1/64", None, "did you mean fd3c:9e12::/64"),
    Case("FD3C:9E12::/32 ", None, "not a number"),
    Case(" FD3C:9E12::/32", None, "whitespace"),
    Case("fd3c:9e12::/", None, "not a number"),
]
LOOKUPS: Final = [
    Case("FD3C:9E12:FF00::1", "fd3c:9e12:ff00::1"),
    Case("fd3c:9e12:ff00:0000:0000:0000:0000:0001", "fd3c:9e12:ff00::1"),
    Case("fd3c:9e12:ff00::0.0.0.1", "fd3c:9e12:ff00::1"),
    Case("64:ff9b::192.0.2.1", "64:ff9b::c000:201"),
    Case("::", "::"),
    Case("fd3c:09e12::1", None, "At most 4 characters"),
    Case("fe80::1%eth0", None, "zone id"),
    Case("::ffff:192.0.2.1", None, "IPv4-mapped"),
    Case("fd3c:9e12::1/128", None, "is a prefix"),
    Case("fd3c:9e12::1::2", None, "not an IPv6 address"),
]
PREFIXES: Final = [
    Case("FD3C:9E12:FF01:{n}::/64", "fd3c:9e12:ff01:{n}::/64"),
    Case("fd3c:9e12:ff01:00{n}0::/64", "fd3c:9e12:ff01:{n}0::/64"),
    Case("fd3c:9e12::1/64", None, "did you mean"),
    Case("fd3c:9e12::/129", None, "between 0 and 128"),
    Case("fd3c:9e12:0:{n}::%eth0/64", None, "zone id"),
    Case("::ffff:10.0.0.0/120", None, "IPv4-mapped"),
    Case("fd3c:09e12::/64", None, "At most 4 characters"),
]


class Outcome(NamedTuple):
    """What a server made of a text: the text it answered, or its refusal's message."""

    answered: str | None
    refusal: str


async def _grpc_answer(channel: grpc.aio.Channel, name: str, request: Message) -> tuple[Any, str]:
    """The answer of RPC ``name``; or None and the message of its INVALID_ARGUMENT."""
    method = next(m for m in METHODS if m.name == name)
    call = channel.unary_unary(
        f"/{method.containing_service.full_name}/{name}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=GetMessageClass(method.output_type).FromString,
    )
    try:
        return await call(request, timeout=10), ""
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    assert code is INVALID, (request, code, details)
    return None, details


async def _create_pool(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, transport: str, name: str, cidr: str
) -> Outcome:
    """Create a root pool in a space of the transport's own (roots of a space never overlap)."""
    if transport == "rest":
        response = await http.post("/v1/pools", json={"name": name, "cidr": cidr, "space": name})
        return _rest_outcome(response, 201, "cidr", "cidr")
    request = ppb.CreatePoolRequest(name=name, cidr=cidr, space=name)
    answer, refusal = await _grpc_answer(channel, "CreatePool", request)
    return Outcome(answer.pool.cidr if answer else None, refusal)


async def _allocate(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, transport: str, prefix: str
) -> Outcome:
    """Allocate an exact prefix from pool ``site``."""
    if transport == "rest":
        body = {"owner": "node/p", "prefix": prefix}
        response = await http.post("/v1/pools/site/allocations", json=body)
        return _rest_outcome(response, 201, "prefix", "prefix")
    request = apb.AllocatePrefixRequest(pool="site", owner="node/p", prefix=prefix)
    answer, refusal = await _grpc_answer(channel, "AllocatePrefix", request)
    return Outcome(answer.allocation.prefix if answer else None, refusal)


async def _lookup(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, transport: str, address: str
) -> tuple[Outcome, list[str]]:
    """Look an address up; what was answered, and the prefixes found."""
    if transport == "rest":
        response = await http.get(f"/v1/lookup/{address.replace('%', '%25')}")
        if response.status_code == 404:  # text with a '/' is a path no route matches
            assert response.headers["content-type"] == PROBLEM
            return Outcome(None, "is a prefix"), []
        outcome = _rest_outcome(response, 200, "address", "address")
        found = response.json().get("allocations", [])
        return outcome, [a["prefix"] for a in found]
    answer, refusal = await _grpc_answer(
        channel, "LookupAddress", apb.LookupAddressRequest(address=address)
    )
    if answer is None:
        return Outcome(None, refusal), []
    return Outcome(answer.address, ""), [a.prefix for a in answer.allocations]


def _rest_outcome(response: httpx.Response, ok: int, key: str, field: str) -> Outcome:
    """A 2xx answer's ``key``, or a 422 problem naming ``field``."""
    if response.status_code == ok:
        return Outcome(response.json()[key], "")
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == field, problem
    return Outcome(None, problem["detail"])


def _expect(case: Case, outcome: Outcome, n: int = 0) -> None:
    """The canonical text was answered, or the refusal says what is wrong."""
    if case.canonical is None:
        assert outcome.answered is None, (case, outcome)
        assert case.words in outcome.refusal, (case, outcome)
    else:
        assert outcome.answered == case.canonical.format(n=n), (case, outcome)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_pool_cidrs_in_ipv6_text(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, db: Database, transport: str
) -> None:
    """Upper case, leading zeros, embedded IPv4: RFC 5952 text; zone ids, mapped, /129: 422."""
    for n, case in enumerate(POOL_CIDRS):
        before = await _state(db)
        _expect(case, await _create_pool(channel, http, transport, f"p{n}", case.text))
        if case.canonical is None:
            assert await _state(db) == before, case


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_lookups_in_ipv6_text(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, transport: str
) -> None:
    """Any spelling of an address finds its holder and is answered in RFC 5952 text."""
    held = await http.post(
        "/v1/pools/site/allocations", json={"owner": "node/x", "prefix": "fd3c:9e12:ff00::/64"}
    )
    assert held.status_code == 201, held.text
    for case in LOOKUPS:
        outcome, found = await _lookup(channel, http, transport, case.text)
        _expect(case, outcome)
        if outcome.answered is not None and outcome.answered.startswith("fd3c:9e12:ff00:"):
            assert found == ["fd3c:9e12:ff00::/64"], (case, found)


@pytest.mark.parametrize(("n", "transport"), [(1, "grpc"), (2, "rest")])
async def test_exact_prefixes_in_ipv6_text(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, db: Database, n: int, transport: str
) -> None:
    """An exact prefix to allocate: held under its canonical text, or refused, nothing written."""
    for case in PREFIXES:
        before = await _state(db)
        _expect(case, await _allocate(channel, http, transport, case.text.format(n=n)), n)
        if case.canonical is None:
            assert await _state(db) == before, case


# -- times ------------------------------------------------------------------------------------


async def test_times_out_of_range_are_refused(
    channel: grpc.aio.Channel, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Timestamps beyond year 1-9999 (or nanos beyond a second) and such REST times: 4xx."""
    lookup = next(m for m in METHODS if m.name == "LookupAddress")
    history = next(m for m in METHODS if m.name == "ListChanges")
    for seconds, nanos in ((2**62, 0), (-(2**62), 0), (253_402_300_800, 0), (0, -1), (0, 10**9)):
        stamp = Timestamp(seconds=seconds, nanos=nanos)
        for method, request in (
            (lookup, apb.LookupAddressRequest(address="fd00:1::1", at=stamp)),
            (history, apb.ListChangesRequest(since=stamp)),
        ):
            code, details = await _call(channel, method, request)
            assert code is INVALID, (method.name, seconds, nanos, code, details)
    for seconds in (-62_135_596_800, 253_402_300_799):  # the first and last second: fine
        stamp = Timestamp(seconds=seconds)
        code, details = await _call(
            channel, lookup, apb.LookupAddressRequest(address="fd00:1::1", at=stamp)
        )
        assert code is grpc.StatusCode.OK, (seconds, details)
    for value in (
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "10000-01-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-01-01T00:00:00+25:00",
        "not a time",
    ):
        for path, key in (("/v1/lookup/fd00:1::1", "at"), ("/v1/history", "since")):
            response = await http.get(path, params={key: value})
            assert response.status_code in {200, 422}, (path, value, response.text)
            if response.status_code == 422:
                assert response.headers["content-type"] == PROBLEM
                assert response.json()["field"] == key, response.text  # never the driver's words
    _no_tracebacks(caplog)
