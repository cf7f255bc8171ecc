"""Authentication benchmark: what API tokens cost on the gRPC hot path (issue #9).

Each run starts ``kipam serve`` twice, each time on a fresh, migrated database (the same way
as ``grpc_bench.py``: a subprocess on free loopback ports, advisory locks):

* **off**: ``KIPAM_AUTH=off``: the auth interceptor hands back each method's handler as it
  is (no wrapper, no per-call work: every caller is the anonymous principal);
* **on**: ``KIPAM_AUTH=required`` with ``KIPAM_BOOTSTRAP_TOKEN`` (one admin token made by
  :func:`service.auth.generate` for the whole benchmark): every call's token is parsed,
  found in the authenticator's cache (PostgreSQL is asked at most once per
  ``KIPAM_AUTH_CACHE_S``, default 5 s), its salted SHA-256 checked, then the policy
  (:func:`service.auth.check`) runs.

Both servers run with ``KIPAM_RATE_LIMIT=0`` (no per-token rate limit: the default, 100
requests/s per token, would refuse most of the load; the bucket's own cost is a few float
operations), the other settings at their defaults. The client sends the same token as
``authorization: Bearer ...`` metadata to both servers, so the bytes on the wire are the same
and only the server's work differs. The order of the two servers alternates between runs
(off, on; on, off; ...) so drift on the box hits both.

Cases on each server (``grpc_bench.run_load``: ``--warmup`` seconds not counted, then
``--seconds`` counted, one client process of raw ``grpc.aio`` stubs): ``AllocatePrefix`` (a
/64) on one pool at 1 and at 32 calls outstanding (each case a pool of its own), and
``GetPool`` on one pool at 1 and 32 calls (a read: cheaper, so a fixed cost per call shows
more). Health checks are not authenticated, so they would show nothing. Afterwards each
allocate case's rows in ``allocations`` must equal its successful calls (warm-up included),
all active, no prefix twice; a GetPool case must have no failed call. Before the load, each
server is probed: on the "on" server a call without a token and one with an unknown token
must be refused UNAUTHENTICATED, and one with the token allowed; on the "off" server a call
without a token must be allowed.

Ratio = on calls/s / off calls/s of the same run; the table gives its median and range over
the runs. Server CPU per call = the server's CPU over the counted window / calls counted.

Before the runs, the same process times the authenticator and the policy in isolation
(:func:`micro`): what one call costs in the server's Python, without gRPC or the database.

Usage: ``python bench/auth_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
[--runs 5] [--seconds 5] [--warmup 1] [--json bench/results-auth.json]``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hmac
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
import grpc_bench

from service import auth
from service.config import TOKEN
from service.grpc.auth import AuthInterceptor
from service.grpc.gen import pool_pb2 as ppb
from service.grpc.gen import pool_pb2_grpc as ppb_grpc

if TYPE_CHECKING:
    import asyncpg

    from service.store import Database
    from service.usecases import Kipam

HIGH = 32
# (case, kind, concurrent calls, pools): each allocate case has a pool of its own.
CASES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("allocate_c1", "allocate", 1, ("auth-allocate-c1",)),
    ("allocate_c32", "allocate", HIGH, ("auth-allocate-c32",)),
    ("get_c1", "get", 1, ("auth-read",)),
    ("get_c32", "get", HIGH, ("auth-read",)),
)
LABELS = {
    "allocate_c1": "AllocatePrefix, 1 pool, 1 call",
    "allocate_c32": "AllocatePrefix, 1 pool, 32 calls",
    "get_c1": "GetPool, 1 call",
    "get_c32": "GetPool, 32 calls",
}
POOLS = tuple(dict.fromkeys(name for _, _, _, pools in CASES for name in pools))
MODES = ("off", "on")


def environment(mode: str, token: str) -> dict[str, str]:
    """The server's KIPAM_* settings for `mode` (the rest as grpc_bench sets them)."""
    if mode == "off":
        return {"KIPAM_AUTH": "off", "KIPAM_RATE_LIMIT": "0"}
    return {"KIPAM_AUTH": "required", "KIPAM_BOOTSTRAP_TOKEN": token, "KIPAM_RATE_LIMIT": "0"}


def probe(target: str, token: str | None) -> str:
    """The status name of one GetPool (on a pool that exists) carrying `token`."""
    with grpc.insecure_channel(target) as channel:
        stub = ppb_grpc.PoolServiceStub(channel)
        try:
            stub.GetPool(
                ppb.GetPoolRequest(name=POOLS[0]),
                timeout=grpc_bench.CALL_TIMEOUT_S,
                metadata=grpc_bench.bearer(token),
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def probes(target: str, mode: str, token: str) -> dict[str, Any]:
    """Whether the server authenticates as `mode` says (see the module's docstring)."""
    seen = {"none": probe(target, None), "token": probe(target, token)}
    if mode == "on":
        seen["unknown"] = probe(target, auth.generate())
        want = {"none": "UNAUTHENTICATED", "token": "OK", "unknown": "UNAUTHENTICATED"}
    else:
        want = {"none": "OK", "token": "OK"}
    return {"seen": seen, "as_expected": seen == want}


def one_server(args: argparse.Namespace, mode: str, token: str) -> dict[str, Any]:
    """Every case on one fresh server and database, authentication `mode` ("off" or "on")."""
    out: dict[str, Any] = {}
    load_before = os.getloadavg()
    with grpc_bench.serving(args.dsn, None, environment(mode, token)) as served:
        target, server = served.target, served.info
        server["load_before"] = load_before
        server["ready_s"] = grpc_bench.wait_serving(served.proc, target, served.log_path)
        grpc_bench.create_pools(target, token, POOLS)
        server["probes"] = probes(target, mode, token)
        for case, kind, concurrency, pools in CASES:
            load = grpc_bench.Load(
                target,
                kind,
                pools,
                concurrency,
                args.warmup,
                args.seconds,
                served.proc.pid,
                token=token,
            )
            result = grpc_bench.run_load(load, concurrency, 1)
            # Server CPU per counted call, in microseconds.
            result["server_cpu_us"] = (
                result["server_cpu"] * args.seconds / result["counted"] * 1e6
                if result["counted"]
                else float("nan")
            )
            if kind == "allocate":
                found = uvloop.run(grpc_bench.count_rows(served.dsn, pools))
                result["rows"] = found["rows"]
                result["verified"] = (
                    found["rows"] == found["prefixes"] == found["active"] == result["ok"]
                )
            else:
                result["verified"] = not result["errors"] and result["ok"] > 0
            out[case] = result
    server["load_after"] = os.getloadavg()
    out["server"] = server
    return out


# -- the authenticator alone -----------------------------------------------------------------


class _Tokens(auth.Tokens):
    """A token table of one row, in memory (the authenticator caches it anyway)."""

    def __init__(self, text: str) -> None:
        super().__init__(cast("Database", None))
        found = TOKEN.fullmatch(text)
        assert found is not None
        salt = os.urandom(16)
        now = dt.datetime.now(dt.UTC)
        self.salt = salt
        self.hash = auth._digest(salt, found.group(2))  # noqa: SLF001 - the stored form
        self.row: dict[str, Any] = {
            "salt": self.salt,
            "hash": self.hash,
            "name": "bootstrap",
            "scope": "admin",
            "pools": [],
            "expires_at": None,
            "revoked_at": None,
            "last_used_at": now,
            "now": now,
        }

    async def find(self, key_id: str) -> asyncpg.Record | None:  # noqa: ARG002 - one row
        return cast("asyncpg.Record", self.row)

    async def used(self, key_id: str) -> None:  # noqa: ARG002 - nothing to record
        return None


class _Context:
    """What the interceptor reads of a gRPC call's context: its metadata."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


class _Details:
    """What the interceptor reads of a call's details: its method."""

    def __init__(self, method: str) -> None:
        self.method = method


class _Kipam:
    """What the interceptor uses of the use cases (only for pool-limited tokens)."""

    async def pool_of(self, allocation: int) -> str:  # noqa: ARG002 - not reached
        return ""


def micro(token: str, calls: int = 50_000, repeat: int = 3) -> dict[str, float]:
    """:func:`micro_once` `repeat` times; the least of each figure (the box is shared)."""
    outs = [micro_once(token, calls) for _ in range(repeat)]
    return {k: min(o[k] for o in outs) for k in outs[0]}


def micro_once(token: str, calls: int) -> dict[str, float]:
    """Microseconds per call of the authenticator and the policy, in this process.

    With authentication on: the interceptor's per-call handler wrap (``intercept_on``; off it
    returns the handler as it is, ``intercept_off``), its whole admission of a GetPool call
    (``admit_on``: metadata scan, authenticate, policy), ``authenticate`` with the token in
    the cache and its parts (the header's parse, the salted SHA-256 and constant-time
    compare), and the policy for an admin token (``check_admin``).
    """
    header = f"Bearer {token}"
    tokens = _Tokens(token)
    on = auth.Authenticator(tokens, required=True)
    off = auth.Authenticator(tokens, required=False)
    context = _Context((("user-agent", "grpc-python-asyncio/1.85"), ("authorization", header)))
    request = ppb.GetPoolRequest(name=POOLS[0])
    kipam = cast("Kipam", _Kipam())
    admit_on = AuthInterceptor(on, kipam)._admit  # noqa: SLF001 - the per-call work
    intercept_on = AuthInterceptor(on, kipam).intercept_service
    intercept_off = AuthInterceptor(off, kipam).intercept_service
    details = _Details("/kipam.v1.PoolService/GetPool")
    handler = grpc.unary_unary_rpc_method_handler(
        kipam.pool_of, request_deserializer=ppb.GetPoolRequest.FromString
    )

    async def continuation(_details: _Details) -> grpc.RpcMethodHandler:
        return handler

    found = TOKEN.fullmatch(token)
    assert found is not None
    secret = found.group(2)

    async def pool_of(_allocation: int) -> str:
        return ""

    def named(_target: auth.Target) -> object:
        return None

    def per_call(seconds: float) -> float:
        return seconds / calls * 1e6

    async def timed() -> dict[str, float]:
        await on.authenticate(header)  # fills the cache
        out: dict[str, float] = {}
        for name, coro in (
            ("intercept_off", lambda: intercept_off(continuation, details)),
            ("intercept_on", lambda: intercept_on(continuation, details)),
            ("admit_on", lambda: admit_on("GetPool", request, context)),
            ("authenticate_on", lambda: on.authenticate(header)),
            ("check_admin", lambda: auth.check(auth.ANONYMOUS, "GetPool", named, pool_of)),
        ):
            start = time.perf_counter()
            for _ in range(calls):
                await coro()
            out[name] = per_call(time.perf_counter() - start)
        return out

    out = uvloop.run(timed())
    start = time.perf_counter()
    for _ in range(calls):
        scheme, _, credentials = header.strip().partition(" ")
        _ = TOKEN.fullmatch(credentials.strip()) if scheme.lower() == "bearer" else None
    out["parse_header"] = per_call(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(calls):
        hmac.compare_digest(auth._digest(tokens.salt, secret), tokens.hash)  # noqa: SLF001
    out["sha256_compare"] = per_call(time.perf_counter() - start)
    return out


# -- the report ------------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    """Median (min..max)."""
    return grpc_bench.spread(values, fmt)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case and mode: median and range of each figure; the on/off ratio of each run."""
    out: dict[str, Any] = {}
    for case, _, _, _ in CASES:
        figures: dict[str, Any] = {}
        for mode in MODES:
            figures[mode] = {
                k: {
                    "median": statistics.median(r[mode][case][k] for r in runs),
                    "min": min(r[mode][case][k] for r in runs),
                    "max": max(r[mode][case][k] for r in runs),
                }
                for k in ("per_s", "p50_ms", "p99_ms", "server_cpu", "server_cpu_us")
            }
        per_run = [r["on"][case]["per_s"] / r["off"][case]["per_s"] for r in runs]
        figures["ratio"] = {
            "median": statistics.median(per_run),
            "min": min(per_run),
            "max": max(per_run),
            "per_run": per_run,
        }
        out[case] = figures
    return out


def print_report(report: dict[str, Any]) -> None:
    """The Markdown table and the checks."""
    runs, summary = report["runs"], report["summary"]

    def both(case: str, key: str, fmt: str) -> str:
        return " / ".join(
            f"{statistics.median(r[mode][case][key] for r in runs):{fmt}}" for mode in MODES
        )

    print(
        f"{report['date']}, {len(runs)} runs x {report['seconds']} s (+{report['warmup']} s "
        f"warm-up), KIPAM_RATE_LIMIT=0, medians (min..max); load average "
        f"{report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after"
    )
    print()
    print(
        "| case | calls/s off | calls/s on | ratio on/off | p50 ms off / on | p99 ms off / on "
        "| server CPU µs/call off / on |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, _, _, _ in CASES:
        ratio = summary[case]["ratio"]
        print(
            f"| {LABELS[case]} "
            f"| {spread([r['off'][case]['per_s'] for r in runs], ',.0f')} "
            f"| {spread([r['on'][case]['per_s'] for r in runs], ',.0f')} "
            f"| **{ratio['median']:.3f}** ({ratio['min']:.3f}..{ratio['max']:.3f}) "
            f"| {both(case, 'p50_ms', '.2f')} | {both(case, 'p99_ms', '.2f')} "
            f"| {both(case, 'server_cpu_us', ',.0f')} |"
        )
    print()
    print(
        "In-process, µs per call: " + ", ".join(f"{k} {v:.2f}" for k, v in report["micro"].items())
    )
    errors: Counter[str] = Counter()
    for r in runs:
        for mode in MODES:
            for case, _, _, _ in CASES:
                errors.update(r[mode][case]["errors"])
    bad = [
        f"run {n + 1} {mode} {case}"
        for n, r in enumerate(runs)
        for mode in MODES
        for case, _, _, _ in CASES
        if not r[mode][case]["verified"]
    ]
    probes_bad = [
        f"run {n + 1} {mode}: {r[mode]['server']['probes']['seen']}"
        for n, r in enumerate(runs)
        for mode in MODES
        if not r[mode]["server"]["probes"]["as_expected"]
    ]
    print(
        "Verified: "
        + ("; ".join(bad) if bad else "allocate rows == successful calls, GetPool no failures")
        + "; failed calls: "
        + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
        + "; probes: "
        + ("; ".join(probes_bad) if probes_bad else "off allows no token, on refuses none/unknown")
    )
    for n, r in enumerate(runs):
        for mode in r["order"]:
            s = r[mode]["server"]
            print(
                f"Server, run {n + 1} {mode}: load {s['load_before'][0]:.2f} -> "
                f"{s['load_after'][0]:.2f}, exit {s.get('exit')} in "
                f"{s.get('stop_s', float('nan')):.2f} s"
                + (" (killed)" if s.get("killed") else "")
                + (f", log: {'; '.join(s['log'])}" if s["log"] else ", log clean")
            )


def main() -> None:
    """Run both servers `--runs` times, alternating their order; print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-auth.json"))
    args = parser.parse_args()
    token = auth.generate()
    load_before = os.getloadavg()
    report: dict[str, Any] = {"micro": micro(token)}
    runs: list[dict[str, Any]] = []
    for n in range(args.runs):
        order = MODES if n % 2 == 0 else MODES[::-1]
        run: dict[str, Any] = {"order": list(order)}
        for mode in order:
            run[mode] = one_server(args, mode, token)
        runs.append(run)
        print(
            f"run {n + 1} ({', '.join(order)}): "
            + ", ".join(
                f"{case} {run['off'][case]['per_s']:.0f} -> {run['on'][case]['per_s']:.0f}/s"
                for case, _, _, _ in CASES
            )
            + f"; load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )
    report |= {
        "runs": runs,
        "summary": summarize(runs),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rate_limit": 0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "grpcio": grpc.__version__,
        "python": sys.version.split()[0],
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "command": " ".join(["python", "bench/auth_bench.py", *sys.argv[1:]]),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report)


if __name__ == "__main__":
    main()
