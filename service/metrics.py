"""Prometheus metrics: what the use cases did, and how full things are when scraped.

``GET /metrics`` (:mod:`service.rest.app`) answers the text format from a registry of kipam's
own (never the library's global one: tests and several servers in one process do not
collide). Two kinds of metrics live there.

Told by the use cases, through :class:`PrometheusObserver` (an :class:`~service.observe.Observer`):

* ``kipam_operations_total{operation,pool,result}``: use cases ended, by name (``allocate``,
  ``allocate_many``, ``release``, ``create_pool``, ``plan_cluster``, ...), pool (the cluster's
  or template's name for cluster operations, ``""`` when the operation names none) and result
  (``ok`` or the error kind: ``invalid``, ``not_found``, ``conflict``, ``exhausted``,
  ``precondition``, ``unavailable``, ``internal``, ``error``). Allocations and releases by
  pool and result are its ``operation="allocate"`` and ``operation="release"`` rows.
  Requests answered ``not_found`` or ``invalid`` are counted with ``pool=""``: their pool
  name is whatever a caller sent, and a label value per typo would grow the series without
  bound.
* ``kipam_operation_duration_seconds{operation}``: how long each use case took.
* ``kipam_lock_wait_seconds{backend}``: how long batches waited for their pools' locks
  (``redis`` or ``advisory``).

Read when scraped, from objects already in memory (:func:`watch_kipam`; no database query,
no table scan, O(pools) engine look-ups of O(prefix bits) each):

* ``kipam_pool_utilization_ratio{pool}``: allocated / (total - reserved) addresses;
* ``kipam_pool_allocations{pool}``: allocations held;
* ``kipam_pool_free_addresses{pool}``: addresses neither held nor reserved (a float: an IPv6
  pool has more than 2**53);
* ``kipam_pool_largest_free_prefix_length{pool}``: the length of the largest free aligned
  block (a /56 says a /56 can still be handed out); absent while the pool is full;
* ``kipam_db_pool_connections{state="in_use"|"idle"}``, ``kipam_db_pool_max_connections``,
  ``kipam_db_pool_saturation_ratio`` (in use / max): the PostgreSQL connection pool;
* ``kipam_watch_subscribers``: live WatchAllocations streams on this replica;
* and the client library's standard ``process_*``, ``python_info`` and ``python_gc_*``.

The pool gauges cover **the pools this replica has served**: engines are per process, built
on a pool's first use and brought up to date from the database whenever the replica works on
the pool, so a replica that never touched a pool reports nothing for it, and one that has
not touched it lately lags behind its peers. Every replica reports a pool under the same
labels; across replicas take the fullest view, the safe one to alert on: ``max by (pool)``
for utilization, allocations and the largest free prefix length (a longer prefix is a
smaller block), ``min by (pool)`` for free addresses. The operation counters and histograms
are per replica: ``sum`` them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily

from service.observe import Observer

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from service.usecases import Kipam

__all__ = ["LATENCY_BUCKETS_S", "LOCK_WAIT_BUCKETS_S", "PrometheusObserver", "watch_kipam"]


def _steps(start: float, stop: float) -> tuple[float, ...]:
    """Bucket bounds in 1-2-5 steps, from ``start`` (a power of ten) to ``stop`` seconds."""
    out: list[float] = []
    decade = start
    while decade <= stop:
        out += [round(decade * m, 6) for m in (1, 2, 5) if decade * m <= stop]
        decade *= 10
    return tuple(out)


# From a fast-path allocation (a fraction of a millisecond: one autocommitted statement) to
# a cluster plan or a batch stuck behind a lock (seconds).
LATENCY_BUCKETS_S: Final = _steps(0.0001, 5.0)[1:]
# An uncontended lock is a Redis round trip or an advisory lock call (~0.1 ms); the wait is
# bounded by KIPAM_LOCK_WAIT_S (5 s by default), after which the request is refused.
LOCK_WAIT_BUCKETS_S: Final = _steps(0.0001, 10.0)
# Results whose pool label would be a caller's input rather than a pool (see the docstring).
_UNLABELLED_RESULTS: Final = frozenset({"invalid", "not_found"})


class PrometheusObserver(Observer):
    """Counts what the use cases report, in a registry of its own.

    Args:
        process: Also export the standard ``process_*``, ``python_info`` and ``python_gc_*``
            metrics, as the library's global registry would (off in unit tests).

    Attributes:
        registry: What ``/metrics`` answers.
    """

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._operations = Counter(
            "kipam_operations",
            "Use cases ended, by operation, pool and result (ok or the error kind).",
            ["operation", "pool", "result"],
            registry=self.registry,
        )
        self._durations = Histogram(
            "kipam_operation_duration_seconds",
            "How long use cases took, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._lock_waits = Histogram(
            "kipam_lock_wait_seconds",
            "How long batches waited for their pools' locks, by lock backend.",
            ["backend"],
            buckets=LOCK_WAIT_BUCKETS_S,
            registry=self.registry,
        )
        # The children by label values: `labels()` validates and locks on every call, and
        # this runs once per request on the hot path.
        self._counted: dict[tuple[str, str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}
        self._waited: dict[str, Histogram] = {}
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def operation(self, name: str, pool: str, result: str, seconds: float) -> None:
        """Count the use case under its pool and result, and time it."""
        key = (name, "" if result in _UNLABELLED_RESULTS else pool, result)
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self._operations.labels(*key)
        counter.inc()
        histogram = self._timed.get(name)
        if histogram is None:
            histogram = self._timed[name] = self._durations.labels(name)
        histogram.observe(seconds)

    def lock_waited(self, backend: str, seconds: float) -> None:
        """Time a batch's wait for its pools' locks."""
        histogram = self._waited.get(backend)
        if histogram is None:
            histogram = self._waited[backend] = self._lock_waits.labels(backend)
        histogram.observe(seconds)


def watch_kipam(observer: PrometheusObserver, kipam: Kipam) -> None:
    """Export ``kipam``'s pools, connection pool and watch streams, read at each scrape."""
    observer.registry.register(_KipamCollector(kipam))


class _KipamCollector:
    """The scrape-time gauges of one :class:`~service.usecases.Kipam` (see the module docs).

    ``collect`` runs where the scrape is served: on the event loop (the ``/metrics`` handler
    is not sent to a thread), so it reads each engine between two of its changes, never
    during one. An engine may include decisions whose statement is still in flight.
    """

    def __init__(self, kipam: Kipam) -> None:
        self._kipam = kipam

    def describe(self) -> list[Metric]:
        """The families, without samples (lets the registry refuse a second registration)."""
        return _Gauges().families()

    def collect(self) -> list[Metric]:
        """The families, with the values of now."""
        gauges = _Gauges()
        # The newest engine of a name wins: a pool deleted elsewhere and created again under
        # its name may leave this replica with both until it next works on the name.
        for name, engine in dict(self._kipam.engines.loaded()).items():
            usage = engine.usage()
            gauges.utilization.add_metric([name], usage.utilization)
            gauges.allocations.add_metric([name], usage.allocations)
            gauges.free.add_metric([name], float(usage.free))
            if usage.largest_free is not None:
                gauges.largest_free.add_metric([name], usage.largest_free.length)
        size, idle, most = self._kipam.db.stats()
        in_use = max(0, size - idle)
        gauges.connections.add_metric(["in_use"], in_use)
        gauges.connections.add_metric(["idle"], idle)
        gauges.max_connections.add_metric([], most)
        gauges.saturation.add_metric([], in_use / most if most else 0.0)
        gauges.subscribers.add_metric([], self._kipam.feed.subscribers)
        return gauges.families()


class _Gauges:
    """One scrape's gauge families, empty until filled."""

    def __init__(self) -> None:
        self.utilization = GaugeMetricFamily(
            "kipam_pool_utilization_ratio",
            "Allocated share of the pool's usable addresses (total minus reserved).",
            labels=["pool"],
        )
        self.allocations = GaugeMetricFamily(
            "kipam_pool_allocations", "Allocations held in the pool.", labels=["pool"]
        )
        self.free = GaugeMetricFamily(
            "kipam_pool_free_addresses",
            "Addresses of the pool neither held nor reserved.",
            labels=["pool"],
        )
        self.largest_free = GaugeMetricFamily(
            "kipam_pool_largest_free_prefix_length",
            "Prefix length of the pool's largest free aligned block (absent when full).",
            labels=["pool"],
        )
        self.connections = GaugeMetricFamily(
            "kipam_db_pool_connections",
            "PostgreSQL connections of the pool, by state.",
            labels=["state"],
        )
        self.max_connections = GaugeMetricFamily(
            "kipam_db_pool_max_connections", "Most connections the pool may open."
        )
        self.saturation = GaugeMetricFamily(
            "kipam_db_pool_saturation_ratio", "Connections in use over the most the pool may open."
        )
        self.subscribers = GaugeMetricFamily(
            "kipam_watch_subscribers", "Live WatchAllocations streams on this replica."
        )

    def families(self) -> list[Metric]:
        return [
            self.utilization,
            self.allocations,
            self.free,
            self.largest_free,
            self.connections,
            self.max_connections,
            self.saturation,
            self.subscribers,
        ]
