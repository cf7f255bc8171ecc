"""schemathesis against the live OpenAPI document of a running `kipam serve`.

The server is a real process on a database of its own. For every operation schemathesis
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
import subprocess
import sys
import time
import urllib.request
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import with_database

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.api, pytest.mark.slow]

EXAMPLES = int(os.environ.get("KIPAM_SCHEMATHESIS_EXAMPLES", "50"))


@pytest.fixture(name="live_url", scope="module")
def _live_url(server_dsn: str, free_port: Callable[[], int]) -> Iterator[str]:
    """`kipam serve` on a fresh database; its base URL."""
    import asyncio  # noqa: PLC0415

    import asyncpg  # noqa: PLC0415

    name = f"kipam_schemathesis_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
        "KIPAM_DATABASE_URL": with_database(server_dsn, name),
        "KIPAM_MIGRATE_ON_START": "true",
        "KIPAM_HTTP_ADDR": f"127.0.0.1:{port}",
        "KIPAM_GRPC_ADDR": f"127.0.0.1:{free_port()}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], env=env, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "kipam serve exited early"
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):  # noqa: S310 - loopback
                    break
            except OSError:
                assert time.monotonic() < deadline, "kipam serve did not become ready"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        assert b"Traceback" not in stderr, stderr.decode()


def test_api_conforms_to_its_schema(live_url: str) -> None:
    """No 5xx, and every answer is what the OpenAPI document says it is, per operation."""
    api = schemathesis.openapi.from_url(f"{live_url}/schema/openapi.json")
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 13
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
            case.call_and_validate(base_url=live_url, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every operation is tried; all failures shown
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
