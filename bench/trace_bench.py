"""Tracing benchmark: AllocatePrefix end to end with spans exported over OTLP, vs tracing off.

Each run starts ``kipam serve`` twice on fresh databases (the same way as
``grpc_bench.py``: a subprocess on free loopback ports, advisory locks), once with tracing
off (no ``OTEL_*`` variables) and once exporting every span over OTLP/gRPC to a receiver in
this process (``OTEL_EXPORTER_OTLP_ENDPOINT``, the batch span processor with its defaults,
sampler always on). The receiver is an OTLP TraceService built from ``opentelemetry-proto``
that counts the spans it is sent: a collector's job, on the same machine. The order of the
two servers alternates between runs, so drift on the box hits both.

Cases: ``AllocatePrefix`` (a /64) at 32 concurrent calls over 16 pools, and at 1 call (one
pool). Ratio = traced calls/s / untraced calls/s, medians of the runs; target at least 0.85.
Traced runs also report the spans received per call (every SQL statement, the Redis-free
lock path, the use case, batch, lock and engine spans, the gRPC server span).

Usage: ``python bench/trace_bench.py [--dsn ...] [--seconds 5] [--runs 3]``. Writes
``bench/results-trace.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

sys.path.insert(0, str(Path(__file__).parent))
import grpc_bench

from service.grpc.gen import pool_pb2 as ppb
from service.grpc.gen import pool_pb2_grpc as ppb_grpc

TARGET = 0.85
# The sampled variant: parentbased_traceidratio at this ratio (a common production setting).
SAMPLED = 0.1
# (case, concurrent calls, pools)
CASES: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("c32", 32, tuple(f"spread-p{i}" for i in range(16))),
    ("c1", 1, ("single",)),
)
LABELS = {"c32": "16 pools, 32 calls", "c1": "1 pool, 1 call"}


class Receiver:
    """An OTLP/gRPC trace receiver that keeps each export's bytes, parsed only when asked.

    Parsing while the benchmark runs would put a second Python process's protobuf decoding
    on the same two cores as the server; a collector would decode them elsewhere, or in Go.
    """

    SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"

    def __init__(self) -> None:
        self.exports: list[bytes] = []
        self._lock = threading.Lock()

    def export(self, request: bytes, _context: object) -> bytes:
        """Keep one export; answer an empty ExportTraceServiceResponse."""
        with self._lock:
            self.exports.append(request)
        return b""

    def handler(self) -> grpc.GenericRpcHandler:
        """The TraceService/Export method on raw bytes."""
        return grpc.method_handlers_generic_handler(
            self.SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self.export)}
        )

    def spans(self) -> int:
        """How many spans were received so far (parses what was kept)."""
        with self._lock:
            exports = list(self.exports)
        total = 0
        for raw in exports:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
            total += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return total


def create_pools(target: str) -> None:
    """Every case's pools, fd11:<i>::/32, default length 64."""
    with grpc.insecure_channel(target) as channel:
        stub = ppb_grpc.PoolServiceStub(channel)
        names = [name for _, _, pools in CASES for name in pools]
        for i, name in enumerate(names, start=1):
            stub.CreatePool(
                ppb.CreatePoolRequest(
                    name=name, cidr=f"fd11:{i:x}::/32", policy=ppb.PoolPolicy(default_length=64)
                ),
                timeout=grpc_bench.CALL_TIMEOUT_S,
            )


def one_server(args: argparse.Namespace, otel: dict[str, str] | None) -> dict[str, Any]:
    """Every case on one fresh server; ``otel`` is its OTEL_* environment (None: off)."""
    out: dict[str, Any] = {}
    with grpc_bench.serving(args.dsn, None, otel) as served:
        target, pid = served.target, served.proc.pid
        grpc_bench.wait_serving(served.proc, target, served.log_path)
        create_pools(target)
        for case, concurrency, pools in CASES:
            load = grpc_bench.Load(
                target, "allocate", pools, concurrency, args.warmup, args.seconds, pid
            )
            out[case] = grpc_bench.run_load(load, concurrency, 1)
    return out


def main() -> None:
    """Run, print, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-trace.json"))
    args = parser.parse_args()
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((receiver.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "kipam-bench",
    }
    environments: dict[str, dict[str, str] | None] = {
        "off": None,
        "on": otel,
        "sampled": {
            **otel,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(SAMPLED),
        },
    }
    runs: list[dict[str, Any]] = []
    try:
        for n in range(args.runs):
            run: dict[str, Any] = {}
            order = list(environments)
            for mode in order[n % len(order) :] + order[: n % len(order)]:  # rotate
                before = receiver.spans()
                run[mode] = one_server(args, environments[mode])
                time.sleep(0.5)  # the last batch of spans (BatchSpanProcessor flushes at exit)
                run[mode]["spans"] = receiver.spans() - before
            runs.append(run)
            print(
                f"run {n + 1}: "
                + ", ".join(
                    f"{mode} {case} {run[mode][case]['per_s']:.0f}/s"
                    for mode in environments
                    for case, _, _ in CASES
                ),
                file=sys.stderr,
            )
    finally:
        server.stop(0)
    report: dict[str, Any] = {"runs": runs, "cases": {}}
    lines = [
        "| case | sampler | calls/s (median) | ratio to off | p50 (ms) | spans exported per call |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    samplers = {"off": "tracing off", "on": "every call", "sampled": f"{SAMPLED:.0%} of traces"}
    for case, _, _ in CASES:
        off = statistics.median(r["off"][case]["per_s"] for r in runs)
        report["cases"][case] = {}
        for mode, label in samplers.items():
            per_s = statistics.median(r[mode][case]["per_s"] for r in runs)
            p50 = statistics.median(r[mode][case]["p50_ms"] for r in runs)
            calls = sum(r[mode][c]["ok"] for r in runs for c, _, _ in CASES)
            spans = sum(r[mode]["spans"] for r in runs)
            ratio = per_s / off
            report["cases"][case][mode] = {
                "calls_per_s": per_s,
                "ratio": ratio,
                "p50_ms": p50,
                "spans_per_call": spans / calls,
            }
            verdict = "" if mode == "off" else (" met" if ratio >= TARGET else " NOT met")
            lines.append(
                f"| {LABELS[case]} | {label} | {per_s:,.0f} | {ratio:.2f}{verdict} | {p50:.2f} "
                f"| {spans / calls:.1f} |"
            )
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
