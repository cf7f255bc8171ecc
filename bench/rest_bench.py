"""REST benchmark: GET lookup and GET allocation beside a trivial route, at 32 connections.

Each run creates a fresh, migrated database, starts ``kipam serve`` on it as a subprocess (free
ports on 127.0.0.1, ``KIPAM_MIGRATE_ON_START=true``, advisory locks, or Redis locks with
``--redis``), waits until ``GET /readyz`` answers 200, then fills one pool over REST: pool
``bench`` (``fd10:1::/32``, default length 64) and ``--allocations`` /64s (default 4,000),
allocated in batches of up to 1,000 (``POST /v1/pools/bench/allocations`` with ``requests``),
and runs ``ANALYZE`` (what autovacuum does within a minute or so of such a fill; until then
PostgreSQL plans the lookup on the empty tables' statistics: ``--no-analyze`` measures that).
It runs the cases below against that one server, then stops it with SIGTERM and drops the
database.

Cases, each driven by wrk (the Debian package) with ``-t2 -c32 --latency`` for ``--seconds``
after an uncounted wrk run of ``--warmup`` seconds; a Lua script (a temporary file) cycles each
wrk thread through the case's paths, in a shuffled order, and counts the answers by status:

* **trivial**: ``GET /healthz``, a synchronous Litestar route that answers a constant on the
  same server: the ceiling (wrk, HTTP/1.1, uvicorn, Litestar's routing; no database);
* **lookup**: ``GET /v1/lookup/<address>``, one address inside each held /64 (its host bits
  picked at random);
* **allocation**: ``GET /v1/allocations/<id>``, each held allocation by id.

Before the counted runs, up to ``VERIFY_SAMPLE`` paths of each case are asked once over a
plain HTTP client: each must answer 200 with the allocation it was made for (lookup: the
allocation holding the address; allocation: that id, active). During the runs, errors are
the non-2xx answers (from the Lua count; wrk's own counter only sees >= 400) and wrk's socket
errors (connect, read, write, timeout after ``WRK_TIMEOUT``); they should be 0. Beside each
case: the server's and wrk's CPU over the run, as a share of one core (the box has 2 cores,
shared by wrk, the server and PostgreSQL, so this tells who is the bottleneck).

From wrk's output: requests/s, and p50 and p99 of its latency distribution (per request, no
correction for coordinated omission). Targets (issue 5), for lookup and allocation alike:
requests/s at least 0.5 of the trivial route's (ratio of the medians; the per-run ratios'
range beside it), and p99 under 20 ms.

Usage: ``python bench/rest_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
[--seconds 5] [--runs 3] [--redis URL]`` (also ``--warmup 1``, ``--allocations 4000``,
``--no-analyze``, ``--json PATH``). Writes ``bench/results-rest.json``
(``results-rest-redis.json`` with ``--redis``) and prints medians (min..max) as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import ipaddress
import json
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
import grpc_bench

WRK = shutil.which("wrk") or "/usr/bin/wrk"
THREADS = 2
CONNECTIONS = 32
WRK_TIMEOUT = "2s"  # wrk's default: a slower answer is a timeout error, not a latency
TARGET_RATIO = 0.5
TARGET_P99_MS = 20.0
POOL = "bench"
POOL_CIDR = "fd10:1::/32"
BATCH = 1000  # allocations per POST while filling the pool
VERIFY_SAMPLE = 100  # paths of each case asked once, checked, before wrk
HTTP_TIMEOUT_S = 60.0
START_TIMEOUT_S = grpc_bench.START_TIMEOUT_S
SEED = 5  # the shuffles and host bits: every run asks the same kind of paths

# (case, label): the first is the ceiling.
CASES = (
    ("trivial", "GET /healthz (trivial route, ceiling)"),
    ("lookup", "GET /v1/lookup/<address>"),
    ("allocation", "GET /v1/allocations/<id>"),
)
CHECKED = ("lookup", "allocation")  # held to the targets

# Reads the paths, one a line; cycles each thread through them from its own start; counts
# answers by status; the main state prints every thread's counts after the run as one JSON line.
LUA = """
local paths = {}
for line in io.lines("%(paths)s") do
  table.insert(paths, line)
end
local threads = {}
local started = 0

function setup(thread)
  thread:set("next_path", math.floor(started * #paths / %(threads)d))
  started = started + 1
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function request()
  next_path = next_path %% #paths + 1
  return wrk.format("GET", paths[next_path])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    table.insert(parts, string.format('"%%d": %%d', status, n))
  end
  io.write("kipam-statuses: {" .. table.concat(parts, ", ") .. "}\\n")
end
"""
SAFE_PATH = re.compile(r"^/[0-9A-Za-z/:._-]*$")  # nothing to escape in a Lua string or a line
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


# -- the server and its data -----------------------------------------------------------------


def call(http_addr: str, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """One HTTP request on a connection of its own; the status and the decoded JSON answer."""
    host, _, port = http_addr.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
    try:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        answer = conn.getresponse()
        raw = answer.read()
    finally:
        conn.close()
    return answer.status, json.loads(raw) if raw else None


def wait_ready(proc: subprocess.Popen[bytes], http_addr: str, log_path: Path) -> float:
    """Poll ``GET /readyz`` until 200; return the seconds it took.

    Raises:
        RuntimeError: the server exited, or was not ready within START_TIMEOUT_S.
    """
    started = time.monotonic()
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"kipam serve exited with {proc.returncode}:\n{tail}")
        try:
            status, _ = call(http_addr, "GET", "/readyz")
            if status == 200:
                return time.monotonic() - started
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            pass  # not listening yet, or answering something else while it starts
        time.sleep(0.05)  # poll interval: a refused connection answers at once
    raise RuntimeError(f"kipam serve not ready after {START_TIMEOUT_S:.0f} s")


def populate(http_addr: str, count: int) -> list[tuple[int, str]]:
    """Pool ``bench`` and `count` /64s in it over REST; their ids and prefixes.

    Raises:
        RuntimeError: an answer was not the 201 expected.
    """
    status, body = call(
        http_addr,
        "POST",
        "/v1/pools",
        {"name": POOL, "cidr": POOL_CIDR, "policy": {"default_length": 64}},
    )
    if status != 201:
        raise RuntimeError(f"POST /v1/pools answered {status}: {body}")
    held: list[tuple[int, str]] = []
    for first in range(0, count, BATCH):
        requests = [
            {"owner": f"bench/n{n}", "prefix_length": 64}
            for n in range(first, min(first + BATCH, count))
        ]
        status, body = call(
            http_addr, "POST", f"/v1/pools/{POOL}/allocations", {"requests": requests}
        )
        if status != 201 or len(body["items"]) != len(requests):
            raise RuntimeError(f"a batch of {len(requests)} answered {status}: {str(body)[:500]}")
        held += [(item["id"], item["prefix"]) for item in body["items"]]
    return held


async def analyze(dsn: str) -> None:
    """Refresh the planner's statistics of every table."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def case_paths(case: str, held: list[tuple[int, str]]) -> list[tuple[str, int | None]]:
    """The case's paths, shuffled, each with the allocation id it must answer."""
    rng = random.Random(SEED)
    if case == "trivial":
        return [("/healthz", None)]
    if case == "lookup":
        paths = []
        for allocation_id, prefix in held:
            net = ipaddress.IPv6Network(prefix)
            host = rng.randrange(1, net.num_addresses)
            paths.append((f"/v1/lookup/{net.network_address + host}", allocation_id))
    else:
        paths = [(f"/v1/allocations/{allocation_id}", allocation_id) for allocation_id, _ in held]
    rng.shuffle(paths)
    return paths


def verify(http_addr: str, case: str, paths: list[tuple[str, int | None]]) -> list[str]:
    """Ask up to VERIFY_SAMPLE of the paths once, evenly spread; what was wrong (empty: none)."""
    step = max(1, len(paths) // VERIFY_SAMPLE)
    wrong: list[str] = []
    for path, allocation_id in paths[::step][:VERIFY_SAMPLE]:
        status, body = call(http_addr, "GET", path)
        if status != 200:
            ok = False
        elif case == "trivial":
            ok = body == {"status": "ok"}
        elif case == "lookup":
            ok = body["address"] == path.rpartition("/")[2] and allocation_id in [
                a["id"] for a in body["allocations"]
            ]
        else:
            ok = body["id"] == allocation_id and body["state"] == "active"
        if not ok:
            wrong.append(f"{case}: GET {path} answered {status} {str(body)[:200]}")
    return wrong


# -- wrk -------------------------------------------------------------------------------------


def write_script(directory: Path, case: str, paths: list[str]) -> Path:
    """The wrk script cycling through `paths` (and the file of paths it reads), in `directory`.

    Raises:
        ValueError: a path, or the directory, has characters the script cannot carry as is.
    """
    listing = directory / f"{case}.paths"
    for path in (*paths, str(listing)):
        if not SAFE_PATH.match(path):
            raise ValueError(f"unexpected characters in {path!r}")
    listing.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    script = directory / f"{case}.lua"
    script.write_text(LUA % {"paths": listing, "threads": THREADS}, encoding="utf-8")
    return script


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99 (ms), requests, socket errors and statuses from wrk's output.

    Raises:
        RuntimeError: a figure is missing from the output.
    """

    def find(pattern: str) -> re.Match[str]:
        found = re.search(pattern, out, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no {pattern!r} in wrk's output:\n{out}")
        return found

    def latency_ms(percent: int) -> float:
        value, unit = find(rf"^\s+{percent}%\s+([0-9.]+)([a-z]+)\s*$").groups()
        return float(value) * UNIT_MS[unit]

    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )  # printed only when there are some
    over_399 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)  # printed only when some
    statuses = {int(k): v for k, v in json.loads(find(r"^kipam-statuses: (.*)$")[1]).items()}
    return {
        "per_s": float(find(r"^Requests/sec:\s+([0-9.]+)")[1]),
        "p50_ms": latency_ms(50),
        "p99_ms": latency_ms(99),
        "requests": int(find(r"^\s+(\d+) requests in ")[1]),
        "statuses": statuses,
        "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "wrk_over_399": int(over_399[1]) if over_399 else 0,
        "socket_errors": dict(
            zip(
                ("connect", "read", "write", "timeout"),
                (int(n) for n in sockets.groups()) if sockets else (0, 0, 0, 0),
                strict=True,
            )
        ),
    }


def children_cpu_s() -> float:
    """User + system CPU time of the waited-for child processes so far (wrk's, here)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, script: Path, seconds: int, server_pid: int) -> dict[str, Any]:
    """One wrk run; its figures, and the server's and wrk's CPU as a share of one core."""
    server, client = grpc_bench.cpu_seconds(server_pid), children_cpu_s()
    started = time.monotonic()
    out = subprocess.run(
        [
            WRK,
            f"-t{THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            f"--timeout={WRK_TIMEOUT}",
            "--latency",
            f"--script={script}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    elapsed = time.monotonic() - started
    figures = parse_wrk(out)
    figures["server_cpu"] = (grpc_bench.cpu_seconds(server_pid) - server) / elapsed
    figures["wrk_cpu"] = (children_cpu_s() - client) / elapsed
    return figures


# -- one run ---------------------------------------------------------------------------------


def run_cases(
    args: argparse.Namespace, http_addr: str, server_pid: int, held: list[tuple[int, str]]
) -> dict[str, Any]:
    """Check each case's paths, then wrk them: warm-up, counted run."""
    out: dict[str, Any] = {}
    wrong: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kipam-rest-bench-") as tmp:
        for case, _ in CASES:
            paths = case_paths(case, held)
            wrong += verify(http_addr, case, paths)
            script = write_script(Path(tmp), case, [p for p, _ in paths])
            url = f"http://{http_addr}{paths[0][0]}"  # the script picks each request's path
            if args.warmup > 0:
                run_wrk(url, script, args.warmup, server_pid)
            out[case] = run_wrk(url, script, args.seconds, server_pid)
            out[case]["paths"] = len(paths)
    out["checks"] = {"held": len(held), "wrong": wrong[:20], "wrong_count": len(wrong)}
    return out


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case on one fresh server and database."""
    with grpc_bench.serving(args.dsn, args.redis) as served:
        http_addr, server = served.http_addr, served.info
        server["ready_s"] = wait_ready(served.proc, http_addr, served.log_path)
        server["locks_at_start"] = grpc_bench.lock_backend(http_addr)
        held = populate(http_addr, args.allocations)
        if args.analyze:
            asyncio.run(analyze(served.dsn))
        out = run_cases(args, http_addr, served.proc.pid, held)
        server["locks_at_end"] = grpc_bench.lock_backend(http_addr)
    out["server"] = server
    return out


# -- the report ------------------------------------------------------------------------------


def errors(run: dict[str, Any]) -> Counter[str]:
    """A case's errors in one run: non-2xx answers and socket errors, by kind."""
    total: Counter[str] = Counter({"non-2xx": run["non_2xx"]})
    total.update(run["socket_errors"])
    return +total  # only the kinds that happened


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges of each case's figures, the ratios and the targets."""
    figures = ("per_s", "p50_ms", "p99_ms", "server_cpu", "wrk_cpu")
    median = {c: {k: statistics.median(r[c][k] for r in runs) for k in figures} for c, _ in CASES}
    ranges = {
        c: {k: [min(r[c][k] for r in runs), max(r[c][k] for r in runs)] for k in figures}
        for c, _ in CASES
    }
    targets: dict[str, Any] = {}
    for case in CHECKED:
        ratio = median[case]["per_s"] / median["trivial"]["per_s"]
        targets[case] = {
            "ratio": ratio,
            "per_run": [r[case]["per_s"] / r["trivial"]["per_s"] for r in runs],
            "ratio_pass": ratio >= TARGET_RATIO,
            "p99_pass": median[case]["p99_ms"] < TARGET_P99_MS,
        }
    return {
        "median": median,
        "range": ranges,
        "targets": targets,
        "errors": {c: sum(sum(errors(r[c]).values()) for r in runs) for c, _ in CASES},
    }


def print_report(report: dict[str, Any]) -> None:
    """The Markdown table of medians (min..max), ratios and targets."""
    runs, summary = report["runs"], report["summary"]

    def cell(case: str, key: str, fmt: str) -> str:
        return grpc_bench.spread([r[case][key] for r in runs], fmt)

    def errors_cell(case: str) -> str:
        total: Counter[str] = Counter()
        for r in runs:
            total.update(errors(r[case]))
        return ", ".join(f"{k} {v}" for k, v in sorted(total.items())) or "0"

    print(
        f"{report['date']}, locks {report['locks']}, wrk -t{THREADS} -c{CONNECTIONS}, "
        f"{report['allocations']:,} allocations held"
        + (", ANALYZE after the fill" if report["analyze"] else ", no ANALYZE")
        + f", {len(runs)} runs x {report['seconds']} s "
        f"(+{report['warmup']} s warm-up), medians (min..max)"
    )
    print()
    print(
        "| case | requests/s | p50 ms | p99 ms | errors | server CPU | wrk CPU "
        "| ratio to trivial | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, label in CASES:
        row = (
            f"| {label} | {cell(case, 'per_s', ',.0f')} | {cell(case, 'p50_ms', '.2f')} "
            f"| {cell(case, 'p99_ms', '.2f')} | {errors_cell(case)} "
            f"| {summary['median'][case]['server_cpu']:.0%} "
            f"| {summary['median'][case]['wrk_cpu']:.0%} |"
        )
        if case in summary["targets"]:
            t = summary["targets"][case]
            row += (
                f" **{t['ratio']:.2f}** ({min(t['per_run']):.2f}..{max(t['per_run']):.2f}) "
                f"| ratio >= {TARGET_RATIO:.2f} {'PASS' if t['ratio_pass'] else 'FAIL'}, "
                f"p99 < {TARGET_P99_MS:.0f} ms {'PASS' if t['p99_pass'] else 'FAIL'} |"
            )
        else:
            row += " | |"
        print(row)
    print()
    bad = [
        f"run {n + 1}: {r['checks']['wrong_count']} wrong answers, e.g. {r['checks']['wrong'][0]}"
        for n, r in enumerate(runs)
        if r["checks"]["wrong_count"]
    ] + [
        f"run {n + 1} {case}: {sum(r[case]['statuses'].values())} answers counted by the script "
        f"for {r[case]['requests']} requests wrk counted"
        for n, r in enumerate(runs)
        for case, _ in CASES
        if sum(r[case]["statuses"].values()) != r[case]["requests"]
    ]
    print(
        "Verified: "
        + (
            "; ".join(bad)
            if bad
            else f"the paths checked (up to {VERIFY_SAMPLE} a case) answered 200 with their "
            "allocation; every answer under wrk counted by status"
        )
    )
    grpc_bench.print_servers(runs, "ready")


def main() -> None:
    """Run everything `--runs` times; print medians as Markdown and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", default=None)
    parser.add_argument("--allocations", type=int, default=4000)
    parser.add_argument("--no-analyze", dest="analyze", action="store_false")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.seconds < 1 or args.runs < 1 or args.allocations < 1:
        parser.error("--seconds, --runs and --allocations must be at least 1")
    runs = [one_run(args) for _ in range(args.runs)]
    report: dict[str, Any] = {
        "runs": runs,
        "summary": summarize(runs),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "allocations": args.allocations,
        "analyze": args.analyze,
        "wrk": {"threads": THREADS, "connections": CONNECTIONS, "timeout": WRK_TIMEOUT},
        "locks": "redis" if args.redis else "advisory",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "command": " ".join(["python", "bench/rest_bench.py", *sys.argv[1:]]),
    }
    path = args.json or Path(__file__).parent / (
        "results-rest-redis.json" if args.redis else "results-rest.json"
    )
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report)


if __name__ == "__main__":
    main()
