"""The Prometheus observer and the scrape-time collector, without a server or a database."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import Policy, PoolAllocator, parse_prefix
from service.metrics import PrometheusObserver, watch_kipam

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from service.usecases import Kipam

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of the registry's text exposition, by name and sorted labels."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def fake_kipam(
    engines: list[tuple[str, PoolAllocator]], stats: tuple[int, int, int], subscribers: int
) -> Kipam:
    """What the collector reads of a Kipam: loaded engines, pool stats, watch streams."""
    fake: Any = SimpleNamespace(
        engines=SimpleNamespace(loaded=lambda: list(engines)),
        db=SimpleNamespace(stats=lambda: stats),
        feed=SimpleNamespace(subscribers=subscribers),
    )
    return cast("Kipam", fake)


def test_operations_are_counted_by_operation_pool_and_result() -> None:
    """Each report adds one to its (operation, pool, result) row and one duration."""
    observer = PrometheusObserver(process=False)
    for _ in range(3):
        observer.operation("allocate", "eu1/pod", "ok", 0.0003)
    observer.operation("allocate", "eu1/pod", "exhausted", 0.001)
    observer.operation("release", "eu1/pod", "ok", 0.0001)
    observer.operation("create_pool", "", "ok", 0.01)
    samples = scrape(observer.registry)
    total = "kipam_operations_total"
    assert value(samples, total, operation="allocate", pool="eu1/pod", result="ok") == 3
    assert value(samples, total, operation="allocate", pool="eu1/pod", result="exhausted") == 1
    assert value(samples, total, operation="release", pool="eu1/pod", result="ok") == 1
    assert value(samples, total, operation="create_pool", pool="", result="ok") == 1
    duration = "kipam_operation_duration_seconds"
    assert value(samples, f"{duration}_count", operation="allocate") == 4
    assert value(samples, f"{duration}_sum", operation="allocate") == pytest.approx(0.0019)
    # 0.3 ms lands above the 0.2 ms bucket and inside the 0.5 ms one.
    assert value(samples, f"{duration}_bucket", operation="allocate", le="0.0002") == 0
    assert value(samples, f"{duration}_bucket", operation="allocate", le="0.0005") == 3
    assert value(samples, f"{duration}_bucket", operation="allocate", le="5.0") == 4
    assert value(samples, f"{duration}_bucket", operation="allocate", le="+Inf") == 4


@pytest.mark.parametrize("result", ["not_found", "invalid"])
def test_caller_input_never_becomes_a_pool_label(result: str) -> None:
    """A pool nobody has, or a malformed name, is counted under pool="" (bounded series)."""
    observer = PrometheusObserver(process=False)
    observer.operation("allocate", "typo-1", result, 0.001)
    observer.operation("allocate", "typo-2", result, 0.001)
    samples = scrape(observer.registry)
    assert value(samples, "kipam_operations_total", operation="allocate", pool="", result=result)
    assert not any(dict(labels).get("pool", "").startswith("typo") for _, labels in samples)


def test_lock_waits_are_timed_by_backend() -> None:
    """Lock waits are one histogram per backend."""
    observer = PrometheusObserver(process=False)
    observer.lock_waited("advisory", 0.002)
    observer.lock_waited("redis", 0.0001)
    observer.lock_waited("redis", 0.3)
    samples = scrape(observer.registry)
    assert value(samples, "kipam_lock_wait_seconds_count", backend="advisory") == 1
    assert value(samples, "kipam_lock_wait_seconds_count", backend="redis") == 2
    assert value(samples, "kipam_lock_wait_seconds_bucket", backend="redis", le="0.0001") == 1


def test_each_observer_has_its_own_registry() -> None:
    """Two observers in one process neither collide nor touch the global registry."""
    first, second = PrometheusObserver(), PrometheusObserver()
    first.operation("allocate", "p", "ok", 0.001)
    assert value(scrape(second.registry), "kipam_operations_total", operation="allocate",
                 pool="p", result="ok") is None  # fmt: skip
    assert REGISTRY.get_sample_value("kipam_operations_total") is None


def test_process_metrics_are_exported_unless_turned_off() -> None:
    """The standard python_info (and process_* where /proc exists) come with the default."""
    names = {name for name, _ in scrape(PrometheusObserver().registry)}
    assert "python_info" in names
    assert not {name for name, _ in scrape(PrometheusObserver(process=False).registry)}


def test_pool_gauges_come_from_the_engines() -> None:
    """Utilization, allocations, free addresses and the largest free block, per pool."""
    # A /60 with a reserved /62: 12 usable /64s, 3 of them held.
    partly = PoolAllocator(
        parse_prefix("fd00:1::/60"),
        Policy(default_length=64, reserved=(parse_prefix("fd00:1::/62"),)),
    )
    for _ in range(3):
        partly.allocate()
    full = PoolAllocator(parse_prefix("fd00:2::/63"), Policy(default_length=64))
    full.allocate()
    full.allocate()
    observer = PrometheusObserver(process=False)
    watch_kipam(observer, fake_kipam([("a", partly), ("b", full)], (4, 1, 10), 2))
    samples = scrape(observer.registry)
    assert value(samples, "kipam_pool_utilization_ratio", pool="a") == pytest.approx(3 / 12)
    assert value(samples, "kipam_pool_allocations", pool="a") == 3
    assert value(samples, "kipam_pool_free_addresses", pool="a") == 9 * 2**64
    # Held fd00:1:0:4..6::/64; the upper half of the /60 is free: a /61 at fd00:1:0:8::.
    assert value(samples, "kipam_pool_largest_free_prefix_length", pool="a") == 61
    assert value(samples, "kipam_pool_utilization_ratio", pool="b") == 1.0
    assert value(samples, "kipam_pool_free_addresses", pool="b") == 0
    assert value(samples, "kipam_pool_largest_free_prefix_length", pool="b") is None


def test_db_pool_and_watch_gauges() -> None:
    """In-use connections are size minus idle; saturation is in-use over the maximum."""
    observer = PrometheusObserver(process=False)
    watch_kipam(observer, fake_kipam([], (4, 1, 10), 2))
    samples = scrape(observer.registry)
    assert value(samples, "kipam_db_pool_connections", state="in_use") == 3
    assert value(samples, "kipam_db_pool_connections", state="idle") == 1
    assert value(samples, "kipam_db_pool_max_connections") == 10
    assert value(samples, "kipam_db_pool_saturation_ratio") == pytest.approx(0.3)
    assert value(samples, "kipam_watch_subscribers") == 2


def test_gauges_follow_the_live_objects() -> None:
    """Every scrape reads the objects anew: later changes show in the next one."""
    engine = PoolAllocator(parse_prefix("fd00:1::/62"), Policy(default_length=64))
    loaded: list[tuple[str, PoolAllocator]] = []
    observer = PrometheusObserver(process=False)
    watch_kipam(observer, fake_kipam(loaded, (1, 1, 5), 0))
    assert value(scrape(observer.registry), "kipam_pool_allocations", pool="p") is None
    loaded.append(("p", engine))
    engine.allocate()
    assert value(scrape(observer.registry), "kipam_pool_allocations", pool="p") == 1


def test_one_series_per_pool_name() -> None:
    """Two engines under one name (a pool deleted and created again) give one series."""
    old = PoolAllocator(parse_prefix("fd00:1::/62"), Policy(default_length=64))
    new = PoolAllocator(parse_prefix("fd00:2::/62"), Policy(default_length=64))
    new.allocate()
    observer = PrometheusObserver(process=False)
    watch_kipam(observer, fake_kipam([("p", old), ("p", new)], (1, 1, 5), 0))
    text = generate_latest(observer.registry).decode()
    assert text.count('kipam_pool_allocations{pool="p"}') == 1
    assert value(scrape(observer.registry), "kipam_pool_allocations", pool="p") == 1


def test_watching_one_kipam_twice_is_refused() -> None:
    """The registry knows the collector's names, so a second registration fails loudly."""
    observer = PrometheusObserver(process=False)
    kipam = fake_kipam([], (1, 1, 5), 0)
    watch_kipam(observer, kipam)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        watch_kipam(observer, kipam)
