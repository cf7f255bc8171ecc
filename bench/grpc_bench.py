"""gRPC benchmark: AllocatePrefix end to end beside a transport ceiling and pgbench, one run.

End to end means a client process -> gRPC -> the ``kipam serve`` process -> PostgreSQL. Each
run creates a fresh, migrated database, starts ``kipam serve`` on it as a subprocess (free
ports on 127.0.0.1, ``KIPAM_MIGRATE_ON_START=true``, advisory locks, or Redis locks with
``--redis``), waits until ``grpc.health.v1`` answers SERVING, creates the pools over gRPC
(root pools in ULA space, ``fd10:<i>::/32``, default length 64), runs the cases below against
that one server, then stops it with SIGTERM and drops the database. The load comes from
separate client processes (``--client-procs``, default 1) using ``grpc.aio`` with the raw
generated stubs; the number of outstanding calls across them is the case's concurrency.

Cases (each: ``--warmup`` seconds not counted, then ``--seconds`` counted; a call counts when
it completes inside the counted window; latency is per call, seen by the client):

* **no-op**: ``grpc.health.v1.Health/Check`` on the same server at 1 and 32 concurrent calls:
  the transport ceiling (client, HTTP/2, the server's gRPC stack; no database);
* **hot**: ``AllocatePrefix`` (a /64, owner ``bench/<n>``) at 1 and 32 concurrent calls, all
  on one pool;
* **spread**: the same on 16 pools, call n on pool n % 16;
* **pgbench ceilings**: the store benchmark's (:func:`store_bench.pgbench`, the one-allocation
  transaction), each on a database of its own before the server starts, one per allocate
  case at its concurrency and on its pools: 1 and 32 clients on one pool, 1 and 32 clients
  over 16 pools. pgbench puts client i on pool i % pools: 32 clients over 16 pools are two on
  each pool, as our 32 calls (call n on pool n % 16) keep about two on each; for 1 client
  over 16 pools that would be pool 1 only, so that one's script picks a pool at random for
  each transaction instead (:data:`ONE_CLIENT_OVER_POOLS`).

Each allocate case has pools of its own; afterwards its rows in ``allocations`` must equal its
successful calls (warm-up included), all active, no prefix twice. Failed calls are counted by
status code. Beside each case: the server's and the clients' CPU over the counted window, as
a share of one core (from /proc; the box has few cores, so this tells who is the bottleneck).

Ratio = ours / min(transport ceiling, pgbench ceiling), both at the case's concurrency, the
pgbench one also on the case's pools; target at least 0.5. On one pool, pgbench's clients
serialize on the pool row as our calls must. A single caller waits for each answer before its
next call, as pgbench's single client waits for each transaction, so the 1-call rows compare
the latency of one call with one transaction's (compare the no-op's p50 too).

Usage: ``python bench/grpc_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
[--seconds 5] [--runs 3] [--redis URL]`` (also ``--warmup 1``, ``--client-procs 1``,
``--json PATH``). Writes ``bench/results-grpc.json`` (``results-grpc-redis.json`` with
``--redis``) and prints medians (min..max) as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import asyncpg
import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Iterator

sys.path.insert(0, str(Path(__file__).parent))
import store_bench

from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import allocation_pb2_grpc as apb_grpc
from service.grpc.gen import pool_pb2 as ppb
from service.grpc.gen import pool_pb2_grpc as ppb_grpc

ROOT = Path(__file__).resolve().parent.parent
KIPAM = ROOT / ".venv" / "bin" / "kipam"
TARGET = 0.5
HIGH = 32
SPREAD_POOLS = 16
CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0

# (case, kind, concurrent calls, pools): each allocate case has pools of its own.
CASES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("noop_c1", "noop", 1, ()),
    ("noop_c32", "noop", HIGH, ()),
    ("hot_c1", "allocate", 1, ("hot-c1",)),
    ("hot_c32", "allocate", HIGH, ("hot-c32",)),
    ("spread_c1", "allocate", 1, tuple(f"spread-c1-p{i}" for i in range(SPREAD_POOLS))),
    ("spread_c32", "allocate", HIGH, tuple(f"spread-c32-p{i}" for i in range(SPREAD_POOLS))),
)
# pgbench ceilings (case, clients, pools): one per allocate case, same concurrency and pools.
CEILINGS: tuple[tuple[str, int, int], ...] = (
    ("ceiling_hot_c1", 1, 1),
    ("ceiling_hot_c32", HIGH, 1),
    ("ceiling_spread_c1", 1, SPREAD_POOLS),
    ("ceiling_spread_c32", HIGH, SPREAD_POOLS),
)
# Row label, case, transport ceiling case, pgbench ceiling case.
ROWS = (
    ("1 pool, 1 call", "hot_c1", "noop_c1", "ceiling_hot_c1"),
    ("1 pool, 32 calls", "hot_c32", "noop_c32", "ceiling_hot_c32"),
    ("16 pools, 1 call", "spread_c1", "noop_c1", "ceiling_spread_c1"),
    ("16 pools, 32 calls", "spread_c32", "noop_c32", "ceiling_spread_c32"),
)
# store_bench's pgbench script with its pool picked at random per transaction, not client i
# on pool i % pools (which leaves a single client on pool 1 alone).
_PINNED = "\\set pool (:client_id % :pools) + 1\n"
assert _PINNED in store_bench.PGBENCH_SCRIPT
ONE_CLIENT_OVER_POOLS = store_bench.PGBENCH_SCRIPT.replace(
    _PINNED, "\\set pool random(1, :pools)\n"
)


# -- the client processes --------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What one client process runs: `callers` concurrent calls of `kind` on `target`."""

    target: str
    kind: str  # "noop" (Health/Check), "allocate" (AllocatePrefix) or "get" (GetPool)
    pools: tuple[str, ...]
    callers: int
    warmup: float
    seconds: float
    server_pid: int
    index: int = 0  # this process's number, of `procs`
    procs: int = 1
    token: str | None = None  # sent as `authorization: Bearer <token>` on every call


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The gRPC metadata carrying an API token (None: no token, no metadata)."""
    return (("authorization", f"Bearer {token}"),) if token else None


async def _load(load: Load, barrier: Any) -> dict[str, Any]:
    """Warm-up, then the counted seconds; what one client process saw."""
    pools = load.pools
    async with grpc.aio.insecure_channel(load.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        health = health_pb2_grpc.HealthStub(channel)
        allocations = apb_grpc.AllocationServiceStub(channel)
        pool_service = ppb_grpc.PoolServiceStub(channel)
        check = health_pb2.HealthCheckRequest()
        metadata = bearer(load.token)
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        done = 0
        seq = 0
        await asyncio.to_thread(barrier.wait, START_TIMEOUT_S)
        counted_from = time.perf_counter() + load.warmup
        until = counted_from + load.seconds

        async def caller() -> None:
            nonlocal done, seq
            while (start := time.perf_counter()) < until:
                n = seq * load.procs + load.index  # call n, across every process
                seq += 1
                try:
                    if load.kind == "noop":
                        await health.Check(check, timeout=CALL_TIMEOUT_S, metadata=metadata)
                    elif load.kind == "get":
                        await pool_service.GetPool(
                            ppb.GetPoolRequest(name=pools[n % len(pools)]),
                            timeout=CALL_TIMEOUT_S,
                            metadata=metadata,
                        )
                    else:
                        await allocations.AllocatePrefix(
                            apb.AllocatePrefixRequest(
                                pool=pools[n % len(pools)], prefix_length=64, owner=f"bench/{n}"
                            ),
                            timeout=CALL_TIMEOUT_S,
                            metadata=metadata,
                        )
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                end = time.perf_counter()
                done += 1
                if counted_from <= end < until:
                    latencies.append(end - start)

        async def cpu() -> tuple[float, float]:
            """CPU seconds of the server and of this process over the counted window."""
            await asyncio.sleep(counted_from - time.perf_counter())
            server, client = cpu_seconds(load.server_pid), time.process_time()
            await asyncio.sleep(until - time.perf_counter())
            return cpu_seconds(load.server_pid) - server, time.process_time() - client

        watch = asyncio.ensure_future(cpu())
        await asyncio.gather(*(caller() for _ in range(load.callers)))
        server_cpu, client_cpu = await watch
    return {
        "latencies": latencies,
        "ok": done,
        "errors": dict(errors),
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
    }


def _client_process(load: Load, barrier: Any, results: Any) -> None:
    """Entry point of one client process: run the load, put the outcome on `results`."""
    try:
        out = uvloop.run(_load(load, barrier))
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the case
        barrier.abort()
        out = {"failed": traceback.format_exc()}
    results.put(out)


def run_load(load: Load, concurrency: int, procs: int) -> dict[str, Any]:
    """One case: `concurrency` calls outstanding from `procs` client processes.

    Returns:
        Calls/s and p50/p99 latency (ms) of the counted window, the successful calls (warm-up
        included) and the failed ones by status code.
    """
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, concurrency))
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_client_process,
            args=(
                replace(load, callers=len(range(i, concurrency, procs)), index=i, procs=procs),
                barrier,
                results,
            ),
            daemon=True,
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    deadline = time.monotonic() + START_TIMEOUT_S + load.warmup + load.seconds + CALL_TIMEOUT_S
    outs: list[dict[str, Any]] = []
    try:
        while len(outs) < procs and time.monotonic() < deadline:
            try:
                outs.append(results.get(timeout=0.5))
            except queue.Empty:
                dead = [w.exitcode for w in workers if w.exitcode not in {None, 0}]
                if dead:  # died before it could put its outcome
                    outs.append({"failed": f"a client process exited with {dead[0]}"})
        if len(outs) < procs:
            outs.append({"failed": "a client process did not answer in time"})
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
                w.join(timeout=10)
    failed = [o["failed"] for o in outs if "failed" in o]
    if failed:
        raise RuntimeError(f"client process failed:\n{failed[0]}")
    latencies = [x for o in outs for x in o["latencies"]]
    errors: Counter[str] = Counter()
    for o in outs:
        errors.update(o["errors"])
    return {
        "per_s": len(latencies) / load.seconds,
        "p50_ms": store_bench.percentile(latencies, 0.5) * 1e3 if latencies else 0.0,
        "p99_ms": store_bench.percentile(latencies, 0.99) * 1e3 if latencies else 0.0,
        "counted": len(latencies),
        "ok": sum(o["ok"] for o in outs),
        "errors": dict(errors),
        # Share of one core over the counted window: the server's, all clients' together.
        "server_cpu": outs[0]["server_cpu_s"] / load.seconds,
        "client_cpu": sum(o["client_cpu_s"] for o in outs) / load.seconds,
    }


# -- the server ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(
    dsn: str, redis_url: str | None, log: Any, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``kipam serve`` on `dsn`; return the process, its gRPC and its HTTP address."""
    grpc_addr = f"127.0.0.1:{free_port()}"
    http_addr = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")}
    env |= {
        "KIPAM_DATABASE_URL": dsn,
        "KIPAM_GRPC_ADDR": grpc_addr,
        "KIPAM_HTTP_ADDR": http_addr,
        "KIPAM_MIGRATE_ON_START": "true",
    }
    if redis_url:
        env["KIPAM_REDIS_URL"] = redis_url
    env |= extra_env or {}
    proc = subprocess.Popen(
        [str(KIPAM), "serve"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    return proc, grpc_addr, http_addr


@dataclass
class Served:
    """A running ``kipam serve`` on a fresh database of its own (see :func:`serving`)."""

    proc: subprocess.Popen[bytes]
    target: str  # its gRPC address
    http_addr: str
    dsn: str  # its database
    log_path: Path
    # What the report says of the server: the caller's figures, then how it stopped
    # (stop_server's figures, or its exit code) and what its log holds (log_notes).
    info: dict[str, Any]


@contextlib.contextmanager
def serving(
    admin_dsn: str, redis_url: str | None = None, extra_env: dict[str, str] | None = None
) -> Iterator[Served]:
    """``kipam serve`` on a fresh database; afterwards stopped, the database dropped.

    On an error the tail of the server's log goes to stderr.
    """
    dsn = uvloop.run(store_bench.fresh_database(admin_dsn))
    with tempfile.NamedTemporaryFile("w+b", prefix="kipam-serve-", suffix=".log") as log:
        log_path = Path(log.name)
        try:
            proc, target, http_addr = start_server(dsn, redis_url, log, extra_env)
        except BaseException:
            uvloop.run(store_bench.drop_database(admin_dsn, dsn))
            raise
        served = Served(proc, target, http_addr, dsn, log_path, {})
        try:
            yield served
        except BaseException:
            tail = log_path.read_text(errors="replace")[-4000:]
            print(f"kipam serve's log (last 4,000 characters):\n{tail}", file=sys.stderr)
            raise
        finally:
            if proc.poll() is None:
                served.info |= stop_server(proc)
            else:
                served.info["exit"] = proc.returncode
            uvloop.run(store_bench.drop_database(admin_dsn, dsn))
            served.info["log"] = log_notes(log_path)


def lock_backend(http_addr: str) -> str:
    """The lock backend the server is using now, from its ``/readyz``."""
    url = f"http://{http_addr}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as exc:  # 503 carries the same JSON
        body = json.load(exc)
    except OSError as exc:
        return f"unknown ({exc})"
    return str(body["locks"]["backend"])


def wait_serving(proc: subprocess.Popen[bytes], target: str, log_path: Path) -> float:
    """Poll grpc.health.v1 until SERVING; return the seconds it took.

    Raises:
        RuntimeError: the server exited, or did not serve within START_TIMEOUT_S.
    """
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"kipam serve exited with {proc.returncode}:\n{tail}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError as exc:
                if exc.code() not in {
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                }:
                    raise
            time.sleep(0.05)  # poll interval: a refused connection answers at once
    raise RuntimeError(f"kipam serve not SERVING after {START_TIMEOUT_S:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM and wait; kill only if it does not exit in STOP_TIMEOUT_S."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)
        return {"exit": proc.returncode, "stop_s": time.monotonic() - started, "killed": True}
    return {"exit": proc.returncode, "stop_s": time.monotonic() - started, "killed": False}


def create_pools(
    target: str, token: str | None = None, names: tuple[str, ...] | None = None
) -> None:
    """These pools (default: every case's), root pools fd10:<i>::/32 (ULA), default length 64.

    With `token`, the calls carry it (a server that requires tokens).
    """
    if names is None:
        names = tuple(name for _, _, _, pools in CASES for name in pools)
    with grpc.insecure_channel(target) as channel:
        stub = ppb_grpc.PoolServiceStub(channel)
        for i, name in enumerate(names, start=1):
            stub.CreatePool(
                ppb.CreatePoolRequest(
                    name=name, cidr=f"fd10:{i:x}::/32", policy=ppb.PoolPolicy(default_length=64)
                ),
                timeout=CALL_TIMEOUT_S,
                metadata=bearer(token),
            )


async def count_rows(dsn: str, pools: tuple[str, ...]) -> dict[str, int]:
    """Rows, distinct prefixes and active rows in `allocations` of these pools."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT a.prefix) AS prefixes,"
            " count(*) FILTER (WHERE a.state = 'active') AS active"
            " FROM allocations a JOIN pools p ON p.id = a.pool_id WHERE p.name = ANY($1::text[])",
            list(pools),
        )
    finally:
        await conn.close()
    assert row is not None
    return dict(row)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_notes(log_path: Path) -> list[str]:
    """The server log's warnings, errors and tracebacks (first 20 lines of them)."""
    text = log_path.read_text(errors="replace")
    marks = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    return [line for line in text.splitlines() if any(m in line for m in marks)][:20]


# -- one run ---------------------------------------------------------------------------------


async def _pgbench_database(server_dsn: str, pools: int) -> str:
    dsn = await store_bench.fresh_database(server_dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await store_bench.make_pools(conn, pools, "pg")
    finally:
        await conn.close()
    return dsn


def pgbench_ceiling(server_dsn: str, clients: int, pools: int, seconds: int) -> dict[str, float]:
    """store_bench's pgbench ceiling of `clients` over `pools`, on a database of its own."""
    script = store_bench.PGBENCH_SCRIPT
    if clients < pools:  # some pools would get no client: spread each client's transactions
        script = ONE_CLIENT_OVER_POOLS
    dsn = uvloop.run(_pgbench_database(server_dsn, pools))
    try:
        with mock.patch.object(store_bench, "PGBENCH_SCRIPT", script):
            return store_bench.pgbench(dsn, clients, pools, seconds)
    finally:
        uvloop.run(store_bench.drop_database(server_dsn, dsn))


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """The pgbench ceilings, then every gRPC case on one fresh server and database."""
    out: dict[str, Any] = {
        case: pgbench_ceiling(args.dsn, clients, pools, args.seconds)
        for case, clients, pools in CEILINGS
    }
    with serving(args.dsn, args.redis) as served:
        target, server = served.target, served.info
        server["ready_s"] = wait_serving(served.proc, target, served.log_path)
        server["locks_at_start"] = lock_backend(served.http_addr)
        create_pools(target)
        for case, kind, concurrency, pools in CASES:
            load = Load(
                target, kind, pools, concurrency, args.warmup, args.seconds, served.proc.pid
            )
            out[case] = run_load(load, concurrency, args.client_procs)
            if kind == "allocate":
                found = uvloop.run(count_rows(served.dsn, pools))
                out[case]["rows"] = found["rows"]
                out[case]["verified"] = (
                    found["rows"] == found["prefixes"] == found["active"] == out[case]["ok"]
                )
        server["locks_at_end"] = lock_backend(served.http_addr)
    out["server"] = server
    return out


# -- the report ------------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    """Median (min..max) of the values."""
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of each figure, and the ratios against the ceilings."""
    cases = [c for c in runs[0] if c != "server"]
    median = {
        c: {
            k: statistics.median(r[c][k] for r in runs)
            for k in runs[0][c]
            if isinstance(runs[0][c][k], float)
        }
        for c in cases
    }
    ranges = {
        c: {k: [min(r[c][k] for r in runs), max(r[c][k] for r in runs)] for k in median[c]}
        for c in cases
    }
    ratios: dict[str, Any] = {}
    for _, case, transport, ceiling in ROWS:
        per_run = [r[case]["per_s"] / min(r[transport]["per_s"], r[ceiling]["per_s"]) for r in runs]
        ceil = min(median[transport]["per_s"], median[ceiling]["per_s"])
        ratio = median[case]["per_s"] / ceil
        ratios[case] = {
            "ratio": ratio,
            "per_run": per_run,
            "bound_by": transport
            if median[transport]["per_s"] <= median[ceiling]["per_s"]
            else ceiling,
            "pass": ratio >= TARGET,
        }
    return {"median": median, "range": ranges, "ratios": ratios}


def print_report(report: dict[str, Any]) -> None:
    """The Markdown table of medians (min..max), ratios and checks."""
    runs, summary = report["runs"], report["summary"]

    def figures(case: str) -> str:
        return " | ".join(
            spread([r[case][k] for r in runs], fmt)
            for k, fmt in (("per_s", ",.0f"), ("p50_ms", ".2f"), ("p99_ms", ".2f"))
        )

    def cpu(case: str) -> str:
        return " | ".join(
            f"{statistics.median(r[case][k] for r in runs):.0%}"
            for k in ("server_cpu", "client_cpu")
        )

    def errors(case: str) -> str:
        total: Counter[str] = Counter()
        for r in runs:
            total.update(r[case]["errors"])
        return ", ".join(f"{k} {v}" for k, v in sorted(total.items())) or "0"

    print(
        f"{report['date']}, locks {report['locks']}, {report['client_procs']} client process(es), "
        f"{len(runs)} runs x {report['seconds']} s (+{report['warmup']} s warm-up), "
        "medians (min..max)"
    )
    print()
    print(
        "| case | calls/s | p50 ms | p99 ms | server CPU | client CPU | errors "
        "| transport ceiling /s | pgbench ceiling /s | ratio | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, case in (("no-op Health/Check, 1 call", "noop_c1"), ("no-op, 32 calls", "noop_c32")):
        print(f"| {label} | {figures(case)} | {cpu(case)} | {errors(case)} | | | | |")
    for label, case, transport, ceiling in ROWS:
        r = summary["ratios"][case]
        bound = "transport" if r["bound_by"] == transport else "pgbench"
        print(
            f"| AllocatePrefix, {label} | {figures(case)} | {cpu(case)} | {errors(case)} "
            f"| {summary['median'][transport]['per_s']:,.0f} "
            f"| {summary['median'][ceiling]['per_s']:,.0f} "
            f"| **{r['ratio']:.2f}** ({min(r['per_run']):.2f}..{max(r['per_run']):.2f}, "
            f"of {bound}) | >= {TARGET:.2f} {'PASS' if r['pass'] else 'FAIL'} |"
        )
    print()
    print("| pgbench ceiling | tx/s | mean latency ms |")
    print("| --- | --- | --- |")
    for case, clients, pools in CEILINGS:
        label = f"{pools} pool{'s' * (pools > 1)}, {clients} client{'s' * (clients > 1)}"
        per_s = spread([r[case]["per_s"] for r in runs], ",.0f")
        mean = spread([r[case]["mean_ms"] for r in runs], ".1f")
        print(f"| {label} | {per_s} | {mean} |")
    print()
    bad = [
        f"run {n + 1} {case}: {r[case]['rows']} rows for {r[case]['ok']} successful calls"
        for n, r in enumerate(runs)
        for _, case, _, _ in ROWS
        if not r[case]["verified"]
    ]
    print("Verified: " + ("; ".join(bad) if bad else "rows in allocations == successful calls"))
    print_servers(runs, "SERVING")


def print_servers(runs: list[dict[str, Any]], ready: str) -> None:
    """One line per run on how its server started, which locks it used and how it stopped."""
    for n, r in enumerate(runs):
        s = r["server"]
        print(
            f"Server, run {n + 1}: {ready} after {s.get('ready_s', float('nan')):.2f} s, "
            f"locks {s.get('locks_at_start')} at start, {s.get('locks_at_end')} at end, "
            f"exit {s.get('exit')} after SIGTERM in {s.get('stop_s', float('nan')):.2f} s"
            + (" (killed)" if s.get("killed") else "")
            + (f", {len(s['log'])} log lines of note:" if s["log"] else ", log clean")
        )
        for line in s["log"]:
            print(f"    {line}")


def main() -> None:
    """Run everything `--runs` times; print medians as Markdown and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", default=None)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [one_run(args) for _ in range(args.runs)]
    report: dict[str, Any] = {
        "runs": runs,
        "summary": summarize(runs),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "locks": "redis" if args.redis else "advisory",
        "client_procs": args.client_procs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "command": " ".join(["python", "bench/grpc_bench.py", *sys.argv[1:]]),
    }
    path = args.json or Path(__file__).parent / (
        "results-grpc-redis.json" if args.redis else "results-grpc.json"
    )
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report)


if __name__ == "__main__":
    main()
