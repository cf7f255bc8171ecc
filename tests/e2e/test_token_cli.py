"""`kipam token` on the server's database, and tokens used by `kipam` against `kipam serve`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from service.auth import generate
from tests.conftest import live_server_process, with_database

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.conftest import LiveServer

pytestmark = [pytest.mark.slow]

BOOTSTRAP = generate()


@pytest.fixture(name="secured", scope="module")
def _secured(
    server_dsn: str, free_port: Callable[[], int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`kipam serve` requiring tokens, started from a bootstrap token."""
    env = {"KIPAM_AUTH": "required", "KIPAM_AUTH_CACHE_S": "0", "KIPAM_BOOTSTRAP_TOKEN": BOOTSTRAP}
    with live_server_process(server_dsn, free_port, tmp_path_factory, env) as server:
        yield server


def kipam(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `kipam ARGS` with only ``env`` of kipam's variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str, env: dict[str, str]) -> Any:
    """A command that must succeed, with --output json; its parsed output."""
    result = kipam(*args, "--output", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tokens_from_the_cli_to_the_history(secured: LiveServer) -> None:
    """Create on the database, use with --token / KIPAM_TOKEN, limit, revoke, the actor."""
    db = {"KIPAM_DATABASE_URL": secured.dsn}
    made = ok("token", "create", "ctl", "--scope", "allocate", "--pools", "eu1-prod/*", env=db)
    ctl = made["token"]
    assert made["created_by"].startswith("cli:")
    twice = kipam("token", "create", "ctl", "--scope", "read", env=db)
    assert twice.returncode == 3, twice.stderr
    assert "exists" in twice.stderr
    bad = kipam("token", "create", "x", "--scope", "read", "--expires", "1y", env=db)
    assert bad.returncode == 1
    assert "duration" in bad.stderr
    assert "Traceback" not in bad.stderr

    server = ["--server", secured.grpc]
    admin = ["--token", BOOTSTRAP]
    create = [*server, "pool", "create", "eu1-prod/lab", "--cidr", "fd3e::/48"]
    refused = kipam(*create[2:], *server)
    assert refused.returncode == 1
    assert "token" in refused.stderr
    assert "Traceback" not in refused.stderr
    ok(*create[2:], *server, "--default-length", "64", *admin, env={})
    held = ok("allocate", "eu1-prod/lab", "--owner", "node/a", *server, env={"KIPAM_TOKEN": ctl})
    assert held["prefix"] == "fd3e::/64"
    outside = kipam("pool", "create", "other", "--cidr", "fd3d::/48", *server, "--token", ctl)
    assert outside.returncode == 1
    assert "scope" in outside.stderr

    listed = kipam("token", "list", "--output", "json", env=db)
    assert listed.returncode == 0, listed.stderr
    assert "kipam_" not in listed.stdout
    assert {t["name"] for t in json.loads(listed.stdout)["items"]} == {"bootstrap", "ctl"}
    assert ok("token", "revoke", "ctl", env=db)["state"] == "revoked"
    gone = kipam("allocate", "eu1-prod/lab", "--owner", "node/b", *server, "--token", ctl)
    assert gone.returncode == 1
    assert "revoked" in gone.stderr

    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{secured.url}/v1/history?pool=eu1-prod/lab",
        headers={"Authorization": f"Bearer {BOOTSTRAP}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
        actors = {c["actor"] for c in json.loads(answer.read())["items"]}
    assert actors == {"bootstrap", "ctl"}


def test_create_prints_the_token_alone_for_scripts(secured: LiveServer) -> None:
    """`TOKEN=$(kipam token create ...)`: stdout is the token, the note goes to stderr."""
    made = kipam(
        "token", "create", "script", "--scope", "read", env={"KIPAM_DATABASE_URL": secured.dsn}
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("kipam_")
    assert made.stdout.count("\n") == 1
    assert "not shown again" in made.stderr
    assert generate() != made.stdout.strip()
    fresh = kipam("token", "generate")
    assert fresh.returncode == 0
    assert fresh.stdout.startswith("kipam_")


def test_serve_refuses_to_start_when_nobody_could_call(
    server_dsn: str, free_port: Callable[[], int]
) -> None:
    """KIPAM_AUTH=required and no token: one line saying what to do, exit 1, no traceback."""
    name = f"kipam_refuse_{uuid.uuid4().hex[:12]}"
    _admin(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        result = kipam(
            "serve",
            env={
                "KIPAM_DATABASE_URL": with_database(server_dsn, name),
                "KIPAM_MIGRATE_ON_START": "true",
                "KIPAM_AUTH": "required",
                "KIPAM_HTTP_ADDR": f"127.0.0.1:{free_port()}",
                "KIPAM_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            },
        )
    finally:
        _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert result.returncode == 1, result.stderr
    assert "kipam token create" in result.stderr
    assert "Traceback" not in result.stderr


def _admin(server_dsn: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())
