"""schemathesis against the live OpenAPI document of a running `kipam serve`.

The server is a real process on a database of its own, requiring API tokens as it does in
production; the cases carry an admin token, and schemathesis' own check that invalid
credentials are refused (401/403) runs on every operation. For every operation schemathesis
generates valid and invalid requests (bounded: ``KIPAM_SCHEMATHESIS_EXAMPLES`` per
operation, 50 by default) and checks that nothing answers 5xx, that every status code,
content type and body is the one the document declares, and that invalid input is refused.

One check is left out: ``positive_data_acceptance``, which expects every schema-valid
request to succeed. kipam answers 422 to well-formed requests that no address plan can
accept (a prefix outside its pool, a length the pool's policy forbids, a name that is not a
pool name), which a JSON schema cannot say.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.auth import generate
from tests.conftest import live_server_process

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.conftest import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.api, pytest.mark.slow]

EXAMPLES = int(os.environ.get("KIPAM_SCHEMATHESIS_EXAMPLES", "50"))
TOKEN = generate()


@pytest.fixture(name="secured", scope="module")
def _secured(
    server_dsn: str, free_port: Callable[[], int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`kipam serve` requiring tokens (an admin bootstrap token), with no rate limit."""
    env = {"KIPAM_AUTH": "required", "KIPAM_BOOTSTRAP_TOKEN": TOKEN, "KIPAM_RATE_LIMIT": "0"}
    with live_server_process(server_dsn, free_port, tmp_path_factory, env) as server:
        yield server


def test_api_conforms_to_its_schema(secured: LiveServer) -> None:
    """No 5xx, and every answer is what the OpenAPI document says it is, per operation."""
    live_url = secured.url
    headers = {"Authorization": f"Bearer {TOKEN}"}
    api = schemathesis.openapi.from_url(f"{live_url}/schema/openapi.json")
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 13
    # Every resource is fuzzed, the token endpoints too.
    labels = {operation.label for operation in operations}
    assert {"POST /v1/tokens", "GET /v1/tokens", "DELETE /v1/tokens/{name}"} <= labels, labels
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=live_url, headers=headers, excluded_checks=[positive_data_acceptance]
            )

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every operation is tried; all failures shown
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
