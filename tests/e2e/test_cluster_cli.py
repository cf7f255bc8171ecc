"""Cluster plans end to end through the `kipam` CLI against a running `kipam serve`.

What a fleet's bootstrap scripts do: carve three clusters from one /32 site pool (IPv6-only,
dual-stack, Cilium cluster-pool), give 500 nodes their pod prefixes, render every target and
validate it against the upstream schemas, and see impossible plans refused with nothing
written.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from service.render import TARGETS
from tests.e2e.test_cli import kipam, ok
from tests.service.upstream import validate_rendered

if TYPE_CHECKING:
    from tests.conftest import LiveServer

pytestmark = [pytest.mark.slow]

SITE = "fd3c:9e12::/32"
SITE4 = "10.0.0.0/8"


def state(server: str) -> tuple[Any, Any, Any]:
    """Everything a refused plan must leave as it was."""
    """Everything a refused plan must leave as it was."""
    return (
        ok(server, "pool", "list"),
        ok(server, "cluster", "list"),
        ok(server, "lookup", "fd3c:9e12:ffff::1"),
    )


def test_three_clusters_500_nodes_and_every_target(live_server: LiveServer) -> None:
    """Three clusters from one /32, 500 nodes, every target rendered and validated."""
    server = live_server.grpc
    ok(server, "pool", "create", "site", "--cidr", SITE)
    ok(server, "pool", "create", "site4", "--cidr", SITE4)

    preview = ok(server, "cluster", "plan", "c1", "--from", "site", "--dry-run")
    assert ok(server, "cluster", "list") == []
    c1 = ok(server, "cluster", "plan", "c1", "--from", "site")
    assert {r: p["cidr"] for r, p in c1["pools"].items()} == {
        r: p["cidr"] for r, p in preview["pools"].items()
    }
    c2 = ok(
        server,
        "cluster",
        "plan",
        "c2",
        "--from",
        "site",
        "--from-ipv4",
        "site4",
        "--template",
        "dual-stack",
    )
    c3 = ok(
        server,
        "cluster",
        "plan",
        "c3",
        "--from",
        "site",
        "--template",
        "ipv6-cluster-pool",
        "--pod-prefix-length",
        "56",
        "--node-prefix-length",
        "64",
        "--set",
        "routing_mode=tunnel",
    )
    blocks = [ipaddress.ip_network(c["block"]) for c in (c1, c2, c3)]
    assert all(b.prefixlen == 48 and b.subnet_of(ipaddress.ip_network(SITE)) for b in blocks)
    assert len(set(blocks)) == 3
    assert c2["ipv4_block"] == "10.0.0.0/16"
    assert c3["settings"]["routing_mode"] == "tunnel"
    # A replay answers the same cluster; exit 0.
    assert ok(server, "cluster", "plan", "c1", "--from", "site") == c1

    # 500 nodes in one call, through stdin; then again: the same prefixes.
    names = "\n".join(f"worker-{i}" for i in range(500)) + "\n"
    first = kipam(server, "node", "allocate", "c1", "--nodes-from", "-", "-o", "json", stdin=names)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # piped: no progress bar
    held = json.loads(first.stdout)
    pod = ipaddress.ip_network(c1["pools"]["pod"]["cidr"])
    prefixes = [ipaddress.ip_network(a["prefix"]) for a in held]
    assert len(set(prefixes)) == 500
    assert all(p.prefixlen == 64 and p.subnet_of(pod) for p in prefixes)
    assert [a["owner"] for a in held] == [f"node/worker-{i}" for i in range(500)]
    again = kipam(server, "node", "allocate", "c1", "--nodes-from", "-", "-o", "json", stdin=names)
    assert json.loads(again.stdout) == held
    dual = ok(server, "node", "allocate", "c2", "worker-1")
    assert [ipaddress.ip_network(a["prefix"]).version for a in dual] == [6, 4]
    ok(server, "vip", "allocate", "c1", "default/ingress-nginx")
    ok(server, "egress", "allocate", "c1", "tenant-a", "--label", "app=billing")

    for cluster in ("c1", "c2", "c3"):
        for target in TARGETS:
            result = kipam(server, "cluster", "render", cluster, target)
            assert result.returncode == 0, result.stderr
            documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
            validate_rendered(target, documents)
            again_text = kipam(server, "cluster", "render", cluster, target).stdout
            assert again_text == result.stdout  # deterministic
    policy = kipam(server, "cluster", "render", "c1", "egress-policy").stdout
    assert "app: billing" in policy

    # Deleting a cluster whose nodes hold prefixes is a refusal (exit 1) until forced.
    refused = kipam(server, "cluster", "delete", "c1")
    assert refused.returncode == 1
    assert "worker-" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    ok(server, "cluster", "delete", "c1", "--force")
    assert [c["name"] for c in ok(server, "cluster", "list")] == ["c2", "c3"]


def test_impossible_plans_are_refused_before_anything_is_written(
    live_server: LiveServer,
) -> None:
    """Impossible templates exit 1 with one line on stderr, and write nothing."""
    server = live_server.grpc
    ok(server, "pool", "create", "site-x", "--cidr", "fd3c:9e13::/32")
    ok(server, "cluster", "plan", "x1", "--from", "site-x")
    before = state(server)
    # The node mask 20 bits below the pod prefix, where the Cilium operator slices it.
    diff = kipam(
        server,
        "cluster",
        "plan",
        "x2",
        "--from",
        "site-x",
        "--template",
        "ipv6-cluster-pool",
        "--node-prefix-length",
        "72",
    )
    assert diff.returncode == 1
    assert diff.stdout == ""
    assert "20 bits longer" in diff.stderr
    assert len(diff.stderr.strip().splitlines()) == 1
    # A /104 service range while the legacy allocator's 20-bit limit applies.
    service = kipam(
        server, "cluster", "plan", "x2", "--from", "site-x", "--service-prefix-length", "104"
    )
    assert service.returncode == 1
    assert "/112" in service.stderr
    # Roles that do not fit in the block.
    crowded = kipam(
        server, "cluster", "plan", "x2", "--from", "site-x", "--block-prefix-length", "52"
    )
    assert crowded.returncode == 1
    assert "do not fit" in crowded.stderr
    # Another plan under a taken name is a conflict (exit 3); a usage error exits 2.
    taken = kipam(server, "cluster", "plan", "x1", "--from", "site-x", "--node-prefix-length", "60")
    assert taken.returncode == 3, taken.stderr
    assert kipam(server, "cluster", "plan", "x2").returncode == 2
    # A failing batch of nodes reports its first failure in one line, never a traceback.
    missing = kipam(server, "node", "allocate", "nosuch", "w-1", "w-2")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "kipam node: There is no cluster named 'nosuch'."
    assert state(server) == before


def test_progress_bar_on_a_terminal_only(live_server: LiveServer) -> None:
    """On a terminal, batch node work shows a progress bar on stderr; stdout stays data."""
    server = live_server.grpc
    ok(server, "pool", "create", "site-p", "--cidr", "fd3c:9e14::/32")
    ok(server, "cluster", "plan", "p1", "--from", "site-p")
    nodes = [f"w-{i}" for i in range(50)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")}
    terminal, stderr = pty.openpty()
    # A terminal of 24 rows and 100 columns (a fresh pty has none, and tqdm draws to fit).
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.cli",
                "node",
                "allocate",
                "p1",
                *nodes,
                "--server",
                server,
                "-o",
                "json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(stderr)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert done.returncode == 0
    assert len(json.loads(done.stdout)) == 50
    assert b"allocating" in shown
    assert b"/50 [" in shown, shown.decode()  # "N/50 [elapsed<left, rate]"
