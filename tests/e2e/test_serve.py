"""`kipam serve` and `kipam migrate` as processes: start, health, shutdown, refusals."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import KipamClient

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from service.models import Allocation

pytestmark = [pytest.mark.slow]

KIPAM = [sys.executable, "-m", "service.cli"]


def get(url: str) -> tuple[int, dict[str, object]]:
    """GET a JSON document; (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_ready(url: str, proc: subprocess.Popen[str], within_s: float = 60) -> dict[str, object]:
    """Poll /readyz until it answers 200, failing early if the process died."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "kipam serve exited early"
        try:
            status, body = get(url)
        except OSError:
            status, body = 0, {}
        if status == 200:
            return body
        time.sleep(0.1)
    raise AssertionError("kipam serve did not become ready")


def postgres_running(data_dir: Path) -> bool:
    """Whether a postgres process serves the embedded cluster in data_dir."""
    needle = str(data_dir / "pgdata")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "postgres" in cmdline and needle in cmdline and "-D" in cmdline:
            return True
    return False


def grpc_serving(target: str) -> bool:
    """grpc.health.v1 Check of the whole server, as grpc_health_probe does it."""
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def allocate_once(target: str) -> Allocation:
    """A pool and one allocation through the typed client."""
    async with KipamClient(target) as client:
        await client.create_pool("site", cidr="fd12:3456:789a::/48")
        allocation, _ = await client.allocate("site", owner="node/a", length=64)
        return allocation


@pytest.fixture(name="data_dir")
def _data_dir() -> Iterator[Path]:
    """A data directory outside pytest's tmp (the embedded server user must reach it)."""
    base = Path(tempfile.mkdtemp(prefix="kipam-e2e-"))
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_on_the_embedded_default(
    data_dir: Path, sig: signal.Signals, free_port: Callable[[], int]
) -> None:
    """With no settings, serve runs on an embedded PostgreSQL, HTTP and gRPC; a signal stops all."""
    port, grpc_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
        "KIPAM_DATA_DIR": str(data_dir),
        "KIPAM_HTTP_ADDR": f"127.0.0.1:{port}",
        "KIPAM_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
    }
    log = data_dir.parent / "serve.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([*KIPAM, "serve"], env=env, stderr=stderr, text=True)
    try:
        body = wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        assert body["database"] == {"up": True, "kind": "embedded"}
        assert body["locks"]["backend"] == "advisory"  # type: ignore[index]
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
        assert postgres_running(data_dir)
        assert grpc_serving(f"127.0.0.1:{grpc_port}")
        allocation = asyncio.run(allocate_once(f"127.0.0.1:{grpc_port}"))
        assert str(allocation.prefix) == "fd12:3456:789a::/64"
        second = subprocess.run(
            [*KIPAM, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert second.returncode == 1
        assert "in use by another kipam process" in second.stderr
        assert "Traceback" not in second.stderr
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        assert not postgres_running(data_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_refuses_an_old_schema_and_migrate_fixes_it(
    empty_database: str, free_port: Callable[[], int]
) -> None:
    """Against a real database serve refuses an unmigrated schema; migrate brings it current."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
        "KIPAM_DATABASE_URL": empty_database,
        "KIPAM_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "KIPAM_GRPC_ADDR": f"127.0.0.1:{free_port()}",
    }
    refused = subprocess.run(
        [*KIPAM, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 1
    assert "run `kipam migrate` first" in refused.stderr
    check = subprocess.run(
        [*KIPAM, "migrate", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 1
    done = subprocess.run(
        [*KIPAM, "migrate", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout)["pending"] == []
    again = subprocess.run(
        [*KIPAM, "migrate", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr


def test_bad_settings_are_a_clear_error() -> None:
    """A malformed setting is one line on stderr and exit status 1, not a traceback."""
    env = {**os.environ, "KIPAM_HTTP_ADDR": "nonsense"}
    result = subprocess.run(
        [*KIPAM, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "KIPAM_HTTP_ADDR" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("taken", ["KIPAM_GRPC_ADDR", "KIPAM_HTTP_ADDR"])
def test_a_taken_port_is_a_clear_error(
    session_database: str, free_port: Callable[[], int], taken: str
) -> None:
    """A listen address in use: exit status 1 and one line naming it, no traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = f"127.0.0.1:{sock.getsockname()[1]}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")},
            "KIPAM_DATABASE_URL": session_database,
            "KIPAM_MIGRATE_ON_START": "true",
            "KIPAM_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "KIPAM_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            taken: busy,
        }
        result = subprocess.run(
            [*KIPAM, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert busy in result.stderr
