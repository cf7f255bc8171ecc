"""The REST API against a real server and database: the scenario table, then the edges."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from service.errors import STATUS
from tests.api.scenarios import SCENARIO, Step, arguments

if TYPE_CHECKING:
    import httpx

pytestmark = [pytest.mark.integration, pytest.mark.api]

PROBLEM = "application/problem+json"


class Failed(Exception):  # noqa: N818 - the REST twin of a raised service error
    """A problem answer, kept for the assertions."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.text)
        self.response = response


def _ns(value: Any) -> Any:
    """JSON as attributes, like the service's values (``a.prefix``, ``page.items``)."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_ns(v) for v in value]
    return value


def _body(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise Failed(response)
    return response.json() if response.content else None


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


async def _run(http: httpx.AsyncClient, step: Step, answers: dict[str, Any]) -> Any:  # noqa: C901, PLR0911 - one branch per operation
    args = arguments(step, answers)
    op = step.op
    if op == "create_pool":
        key = args.pop("idempotency_key", None)
        body = _drop_none(args)
        response = await http.post(
            "/v1/pools", json=body, headers={"Idempotency-Key": key} if key else {}
        )
        return _ns(_body(response)), response.status_code == 201
    if op == "get_pool":
        return _ns(_body(await http.get(f"/v1/pools/{args['name']}")))
    if op == "delete_pool":
        return _body(await http.delete(f"/v1/pools/{args['name']}"))
    if op == "allocate":
        key = args.pop("idempotency_key", None)
        pool = args.pop("pool")
        args["prefix_length"] = args.pop("length", None)
        body = _drop_none(args)
        response = await http.post(
            f"/v1/pools/{pool}/allocations",
            json=body,
            headers={"Idempotency-Key": key} if key else {},
        )
        return _ns(_body(response)), response.status_code == 201
    if op == "allocate_many":
        requests = [{"owner": o, "prefix_length": args["length"]} for o in args["owners"]]
        response = await http.post(
            f"/v1/pools/{args['pool']}/allocations", json={"requests": requests}
        )
        return [(a, True) for a in _ns(_body(response)).items]
    if op == "lookup":
        return _ns(_body(await http.get(f"/v1/lookup/{args['address']}"))).allocations
    if op == "usage":
        return _ns(_body(await http.get(f"/v1/pools/{args['name']}/usage", params=args)))
    if op == "available":
        name = args.pop("name")
        return _body(await http.get(f"/v1/pools/{name}/available", params=args))["items"]
    if op == "release":
        return _ns(_body(await http.delete(f"/v1/allocations/{args['allocation_id']}")))
    if op == "get_allocation":
        return _ns(_body(await http.get(f"/v1/allocations/{args['allocation_id']}")))
    if op == "list_allocations":
        return _ns(_body(await http.get("/v1/allocations", params=args)))
    if op == "history":
        return _ns(_body(await http.get("/v1/history", params=args)))
    raise AssertionError(op)


async def test_scenario_table(http: httpx.AsyncClient) -> None:
    """Every step of the shared scenario answers as the table says, errors as problems."""
    answers: dict[str, Any] = {}
    for step in SCENARIO:
        if step.grpc_only:
            continue
        if step.expect is not None:
            with pytest.raises(Failed) as caught:
                await _run(http, step, answers)
            response = caught.value.response
            assert response.status_code == STATUS[step.expect].http, f"{step.id}: {response.text}"
            assert response.headers["content-type"] == PROBLEM, step.id
            problem = response.json()
            assert problem["type"] == f"urn:kipam:problem:{step.expect.value}", step.id
            assert problem["status"] == response.status_code
            continue
        answer = await _run(http, step, answers)
        if step.check is not None:
            assert step.check(answer), f"{step.id}: {answer!r}"
        answers[step.id] = answer
