"""Redis Sentinel for the lock backend: real redis-server processes on loopback, one failover.

A master, a replica and one sentinel monitoring them. The lock manager is given only the
sentinel's address (``redis+sentinel://...``); it must find the master, and follow it after
``SENTINEL FAILOVER`` promotes the replica.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from service.locks import LockManager, redis_client
from tests.conftest import redis_server_binary, wait_listening

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


@pytest.fixture(name="spawn")
def _spawn(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start redis-server processes on free loopback ports; killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, sentinel: bool = False) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        work = tmp_path / str(port)
        work.mkdir()
        if sentinel:
            config = work / "sentinel.conf"
            config.write_text(f"port {port}\nbind 127.0.0.1\ndir {work}\n" + "\n".join(args) + "\n")
            command = [redis_server_binary(), str(config), "--sentinel"]
        else:
            options = ["--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            options += ["--appendonly", "no", "--dir", str(work)]
            command = [redis_server_binary(), *options, *args]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        wait_listening(proc, port)
        return port

    yield spawn
    for proc in started:
        proc.kill()
        proc.wait(10)


async def until(check: Callable[[], object], within: float = 30.0) -> None:
    """Poll an async check until it is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():  # type: ignore[misc]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="session")
async def test_locks_follow_the_master_through_a_failover(spawn: Callable[..., int]) -> None:
    """Sentinel finds the master; after a failover the locks are taken on the new master."""
    master = spawn()
    replica = spawn("--replicaof", "127.0.0.1", str(master))
    sentinel = spawn(
        f"sentinel monitor kipam 127.0.0.1 {master} 1",
        "sentinel down-after-milliseconds kipam 1000",
        "sentinel failover-timeout kipam 5000",
        # Known from the start: otherwise found on the master's INFO, polled every 10 s.
        f"sentinel known-replica kipam 127.0.0.1 {replica}",
        sentinel=True,
    )
    admin = Redis(host="127.0.0.1", port=sentinel)
    on_master = Redis(host="127.0.0.1", port=master)
    on_replica = Redis(host="127.0.0.1", port=replica)

    async def replica_known() -> bool:
        info = await on_replica.info("replication")
        replicas = await admin.execute_command("SENTINEL", "REPLICAS", "kipam")
        return info.get("master_link_status") == "up" and bool(replicas)

    locks = LockManager(f"redis+sentinel://127.0.0.1:{sentinel}/kipam", retry_s=0.05)
    await locks.start()
    try:
        assert locks.backend == "redis"
        async with locks.hold_many([7]) as holds:
            assert holds[0].backend == "redis"
            assert await on_master.keys("*"), "the lock is taken on the master"
        await until(replica_known)
        await admin.execute_command("SENTINEL", "FAILOVER", "kipam")

        async def promoted() -> bool:
            _host, port = await admin.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "kipam"
            )
            return int(port) == replica and (await on_replica.info("replication"))["role"] == (
                "master"
            )

        await until(promoted)

        async def locked_on_new_master() -> bool:
            async with locks.hold_many([8]) as holds:
                if holds[0].backend != "redis":
                    return False
                return bool(await on_replica.keys("*8*"))

        # Until sentinel turns the old master into a replica (seconds), it still takes writes,
        # and the client keeps using it; then the client follows the new master. (Redis locks
        # only spare contention: PostgreSQL's row locks and fences keep writers correct.)
        await until(locked_on_new_master)
    finally:
        await locks.close()
        for client in (admin, on_master, on_replica):
            await client.aclose()


def test_sentinel_urls_are_checked() -> None:
    """A Sentinel URL needs sentinels and a service name; plain URLs are redis-py's."""
    for bad in ("redis+sentinel:///kipam", "redis+sentinel://h:1", "redis+sentinel://h/kipam"):
        with pytest.raises(ValueError, match="sentinel"):
            redis_client(bad)
    client, sentinels = redis_client("redis+sentinel://:secret@[::1]:26379,127.0.0.1:26380/kipam/2")
    assert len(sentinels) == 2
    assert client.connection_pool.service_name == "kipam"  # type: ignore[attr-defined]
    assert client.connection_pool.connection_kwargs["db"] == 2
    assert client.connection_pool.connection_kwargs["password"] == "secret"  # noqa: S105
