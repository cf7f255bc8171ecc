"""The `kipam` client commands against a running `kipam serve`, as a bootstrap script runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tests.conftest import LiveServer

pytestmark = [pytest.mark.slow]


def kipam(
    server: str, *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `kipam ARGS --server SERVER`; the environment (``env``) says nothing of kipam."""
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("KIPAM_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--server", server],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(server: str, *args: str) -> Any:
    """A command that must succeed, with --output json; its parsed output."""
    result = kipam(server, *args, "--output", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_bootstrap_script_carves_and_allocates(live_server: LiveServer) -> None:
    """Pools, an allocation with a retry, usage, lookup, release: JSON a script can read."""
    server = live_server.grpc
    site = ok(
        server,
        "pool",
        "create",
        "site",
        "--cidr",
        "fd3c:9e12:7a40::/48",
        "--default-length",
        "64",
        "--quarantine",
        "0",
        "--label",
        "region=eu",
    )
    assert (site["cidr"], site["labels"]) == ("fd3c:9e12:7a40::/48", {"region": "eu"})
    pod = ok(
        server,
        "pool",
        "create",
        "eu1/pod",
        "--parent",
        "site",
        "--prefix-length",
        "52",
        "--role",
        "pod",
        "--default-length",
        "64",
        "--quarantine",
        "0",
    )
    assert (pod["parent"], pod["role"], pod["cidr"]) == ("site", "pod", "fd3c:9e12:7a40::/52")
    first = ok(
        server, "allocate", "eu1/pod", "--owner", "node/worker-1", "--idempotency-key", "worker-1"
    )
    again = ok(
        server, "allocate", "eu1/pod", "--owner", "node/worker-1", "--idempotency-key", "worker-1"
    )
    assert first == again
    assert first["prefix"] == "fd3c:9e12:7a40::/64"
    exact = ok(
        server,
        "allocate",
        "eu1/pod",
        "--owner",
        "node/worker-2",
        "--prefix",
        "fd3c:9e12:7a40:ff::/64",
        "--label",
        "rack=r1",
    )
    assert exact["labels"] == {"rack": "r1"}
    usage = ok(server, "pool", "usage", "eu1/pod", "--length", "64")
    assert (usage["allocations"], usage["free_blocks"]) == (2, str(2**12 - 2))
    found = ok(server, "lookup", "fd3c:9e12:7a40:ff::9")
    assert [a["owner"] for a in found] == ["node/worker-2", "pool/eu1/pod"]  # innermost first
    names = [p["name"] for p in ok(server, "pool", "list")]
    assert names == ["eu1/pod", "site"]
    released = ok(server, "release", str(first["id"]))
    assert released["state"] == "released"
    yaml_out = kipam(server, "pool", "show", "site", "--output", "yaml")
    assert yaml_out.returncode == 0
    assert "cidr: fd3c:9e12:7a40::/48" in yaml_out.stdout
    table = kipam(server, "lookup", "fd3c:9e12:7a40:ff::9")
    assert table.stdout.splitlines()[0].split()[:4] == ["ID", "POOL", "PREFIX", "OWNER"]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("pool", "create", "dup", "--cidr", "fd3c:9e12:7a41::/48"), 3, "overlaps"),
        (("allocate", "tiny", "--owner", "vip/c"), 3, "no free"),
        (("pool", "show", "missing"), 1, "no pool named"),
        (("allocate", "tiny", "--owner", "no owner"), 1, "owner"),
        (("lookup", "not-an-address"), 1, "not an"),
        (("allocate", "tiny"), 2, "--owner"),
        (("lookup", "::1", "--at", "yesterday"), 2, "RFC 3339"),
    ],
    ids=["conflict", "exhausted", "not-found", "invalid", "bad-address", "usage", "bad-time"],
)
def test_failures_are_one_line_with_the_exit_code(
    live_server: LiveServer, args: tuple[str, ...], code: int, says: str
) -> None:
    """Conflicts and exhaustion exit 3, other errors 1, usage 2: one line, no traceback."""
    server = live_server.grpc
    if kipam(server, "pool", "show", "tiny").returncode != 0:
        ok(server, "pool", "create", "dup", "--cidr", "fd3c:9e12:7a41::/48")
        ok(
            server,
            "pool",
            "create",
            "tiny",
            "--cidr",
            "fd3c:9e12:7a42::/64",
            "--default-length",
            "65",
            "--alignment-bits",
            "1",
        )
        ok(server, "allocate", "tiny", "--owner", "vip/a")
        ok(server, "allocate", "tiny", "--owner", "vip/b")
    result = kipam(server, *args)
    assert result.returncode == code, result.stderr
    assert says.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    if code != 2:
        assert len(result.stderr.strip().splitlines()) == 1


def test_no_server_is_a_clear_error(free_port: Any) -> None:
    """Nothing listening: exit 1 and a line naming the address and how to set it."""
    address = f"127.0.0.1:{free_port()}"
    result = kipam(address, "pool", "list", "--timeout", "3")
    assert result.returncode == 1
    assert address in result.stderr
    assert "KIPAM_SERVER" in result.stderr
    assert "Traceback" not in result.stderr
