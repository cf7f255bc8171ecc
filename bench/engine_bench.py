"""Engine benchmark: 10**6 /64s from a /32, against what scripts do today and against pytricia.

Every measurement runs in a fresh interpreter (so resident memory is the allocator's own),
several times; the report gives the median and the spread. In one run of this script:

* **engine**: 10**6 ``allocate(64)`` from 2001:db8::/32 for each strategy, then 10**6
  lookups of random addresses inside held prefixes, then releasing every prefix in random
  order; resident memory per live allocation after the allocations.
* **baseline 1** (netaddr): what scripts do today to find the next free /64: rebuild
  ``IPSet([pool]) - IPSet(allocated)`` from the list of held prefixes and take the first free
  /64, at 10**3 and 10**4 existing allocations, beside the engine's ``allocate(64)`` on a
  long-lived allocator holding as many (and, for the record, an engine rebuilt per request).
* **baseline 2** (floor): plain pytricia inserts of the same 10**6 prefixes.

Usage: ``python bench/engine_bench.py [--runs 5] [--n 1000000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

POOL = "2001:db8::/32"


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    with Path("/proc/self/statm").open(encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096


def run_engine(strategy: str, n: int, seed: int) -> dict[str, float]:
    """Allocate n /64s, look up n addresses, release all; return rates and bytes per allocation."""
    from engine import Policy, PoolAllocator, Prefix, Strategy, parse_prefix  # noqa: PLC0415

    rng = random.Random(seed)
    before = rss_bytes()
    allocator = PoolAllocator(parse_prefix(POOL), Policy(strategy=Strategy(strategy)))
    start = time.perf_counter()
    for _ in range(n):
        allocator.allocate(64)
    alloc_s = time.perf_counter() - start
    per_alloc = (rss_bytes() - before) / n
    held = allocator.allocations()
    probes = [Prefix(6, p.value | rng.getrandbits(64), 128) for p in rng.choices(held, k=n)]
    start = time.perf_counter()
    for address in probes:
        if allocator.lookup(address) is None:
            raise AssertionError(address)
    lookup_s = time.perf_counter() - start
    rng.shuffle(held)
    start = time.perf_counter()
    for prefix in held:
        allocator.release(prefix)
    release_s = time.perf_counter() - start
    if len(allocator) or allocator.usage().largest_free != parse_prefix(POOL):
        raise AssertionError("the pool did not return to empty")
    return {
        "alloc_per_s": n / alloc_s,
        "lookup_per_s": n / lookup_s,
        "release_per_s": n / release_s,
        "bytes_per_alloc": per_alloc,
        "alloc_s": alloc_s,
    }


def run_pytricia(n: int) -> dict[str, float]:
    """Insert the same n /64 keys into a bare pytricia tree (the floor)."""
    import pytricia  # noqa: PLC0415

    base = 0x20010DB8 << 96
    keys = [((base | (i << 64)).to_bytes(16, "big"), 64) for i in range(n)]
    tree: pytricia.PyTricia[int] = pytricia.PyTricia(128)
    start = time.perf_counter()
    for key in keys:
        tree.insert(key, 64)
    insert_s = time.perf_counter() - start
    return {"insert_per_s": n / insert_s, "insert_s": insert_s}


def run_baseline(existing: int, requests: int) -> dict[str, float]:
    """Next free /64 with netaddr (rebuilt per request) vs the engine, at `existing` held /64s."""
    import netaddr  # noqa: PLC0415

    from engine import Policy, PoolAllocator, parse_prefix  # noqa: PLC0415

    pool = "2001:db8::/32"
    # Held prefixes spread over the pool as a long-running cluster leaves them: every other /64.
    base = 0x20010DB8 << 96
    held_text = [str(netaddr.IPNetwork((base | (2 * i << 64), 64))) for i in range(existing)]

    def netaddr_next_free() -> str:
        free = netaddr.IPSet([pool]) - netaddr.IPSet(held_text)
        for cidr in free.iter_cidrs():
            if cidr.prefixlen <= 64:
                return str(netaddr.IPNetwork((cidr.first, 64)))
        raise AssertionError("full")

    start = time.perf_counter()
    for _ in range(requests):
        answer = netaddr_next_free()
    netaddr_s = (time.perf_counter() - start) / requests

    held = [parse_prefix(t) for t in held_text]
    allocator = PoolAllocator(parse_prefix(pool), Policy(), held)
    if str(allocator.next_free(64)) != answer:
        raise AssertionError((allocator.next_free(64), answer))
    rounds = 20_000
    start = time.perf_counter()
    for _ in range(rounds):  # allocate and give back, so the pool stays at `existing`
        allocator.release(allocator.allocate(64))
    engine_s = (time.perf_counter() - start) / rounds

    start = time.perf_counter()
    for _ in range(requests):  # the engine used the way the script uses netaddr: rebuilt each time
        PoolAllocator(parse_prefix(pool), Policy(), [parse_prefix(t) for t in held_text]).allocate(
            64
        )
    rebuild_s = (time.perf_counter() - start) / requests
    return {
        "netaddr_ms": netaddr_s * 1e3,
        "engine_us": engine_s * 1e6,
        "engine_rebuilt_ms": rebuild_s * 1e3,
        "ratio": netaddr_s / engine_s,
        "ratio_rebuilt": netaddr_s / rebuild_s,
    }


def child(args: list[str]) -> dict[str, float]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every field across runs."""
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "min": min(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in samples[0]
    }


def machine() -> dict[str, str]:
    """What this ran on."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "python": platform.python_version(),
        "pytricia": version("pytricia"),
        "netaddr": version("netaddr"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    """Run every measurement `--runs` times and print a Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "engine":
            result = run_engine(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "pytricia":
            result = run_pytricia(int(rest[0]))
        else:
            result = run_baseline(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return

    report: dict[str, object] = {"machine": machine(), "n": args.n, "runs": args.runs}
    for strategy in ("lowest", "best_fit"):
        samples = [child(["engine", strategy, str(args.n), str(run)]) for run in range(args.runs)]
        report[f"engine_{strategy}"] = summarize(samples)
    report["pytricia"] = summarize([child(["pytricia", str(args.n)]) for _ in range(args.runs)])
    for existing, requests in ((1_000, 50), (10_000, 5)):
        samples = [child(["baseline", str(existing), str(requests)]) for _ in range(args.runs)]
        report[f"baseline_{existing}"] = summarize(samples)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(render(report))


def render(report: dict[str, object]) -> str:
    """The report as Markdown tables."""

    def cell(stats: dict[str, float], fmt: str) -> str:
        return f"{stats['median']:{fmt}} ({stats['min']:{fmt}}..{stats['max']:{fmt}})"

    m = report["machine"]
    assert isinstance(m, dict)
    lines = [
        (
            f"Machine: {m['cpu']}, Python {m['python']}, pytricia {m['pytricia']}, "
            f"netaddr {m['netaddr']}; {m['date']}; median (min..max) of {report['runs']} runs, "
            "each in a fresh process."
        ),
        "",
        f"| {report['n']:,} /64s from {POOL} | lowest | best_fit | target |",
        "| --- | --- | --- | --- |",
    ]
    rows = [
        ("allocations/s", "alloc_per_s", ",.0f", ">= 80,000"),
        ("releases/s (random order)", "release_per_s", ",.0f", ">= 80,000"),
        ("lookups/s", "lookup_per_s", ",.0f", ">= 200,000"),
        ("resident bytes per live allocation", "bytes_per_alloc", ",.0f", "<= 400"),
    ]
    for title, key, fmt, target in rows:
        cells = []
        for strategy in ("lowest", "best_fit"):
            stats = report[f"engine_{strategy}"]
            assert isinstance(stats, dict)
            cells.append(cell(stats[key], fmt))
        lines.append(f"| {title} | {cells[0]} | {cells[1]} | {target} |")
    tricia = report["pytricia"]
    assert isinstance(tricia, dict)
    lines += [
        "",
        "| baseline 2: plain pytricia inserts | inserts/s | engine time / pytricia time |",
        "| --- | --- | --- |",
    ]
    ratios = []
    for strategy in ("lowest", "best_fit"):
        stats = report[f"engine_{strategy}"]
        assert isinstance(stats, dict)
        ratios.append(
            f"{strategy} {stats['alloc_s']['median'] / tricia['insert_s']['median']:.1f}x"
        )
    lines.append(
        f"| same {report['n']:,} keys | {cell(tricia['insert_per_s'], ',.0f')} | "
        f"{', '.join(ratios)} |"
    )
    lines += [
        "",
        (
            "| baseline 1: next free /64 | netaddr IPSet rebuilt per request | engine allocate "
            "(long-lived) | ratio | engine rebuilt per request | ratio |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for existing in (1_000, 10_000):
        stats = report[f"baseline_{existing}"]
        assert isinstance(stats, dict)
        lines.append(
            f"| {existing:,} held | {cell(stats['netaddr_ms'], '.1f')} ms | "
            f"{cell(stats['engine_us'], '.2f')} µs | {cell(stats['ratio'], ',.0f')}x | "
            f"{cell(stats['engine_rebuilt_ms'], '.1f')} ms | "
            f"{cell(stats['ratio_rebuilt'], ',.1f')}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
