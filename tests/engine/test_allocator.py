from __future__ import annotations

import pytest

from engine import (
    EngineError,
    ErrorKind,
    InvalidPrefixError,
    NotAllocatedError,
    Policy,
    PolicyViolationError,
    PoolAllocator,
    PoolExhaustedError,
    PrefixConflictError,
    Strategy,
    parse_address,
    parse_prefix,
)


def pool(cidr: str, **policy: object) -> PoolAllocator:
    """An allocator for ``cidr``; ``reserved`` is given as text."""
    reserved = tuple(parse_prefix(r) for r in policy.pop("reserved", ()))  # type: ignore[attr-defined]
    return PoolAllocator(parse_prefix(cidr), Policy(reserved=reserved, **policy))  # type: ignore[arg-type]


def texts(prefixes: object) -> list[str]:
    """The prefixes as canonical text."""
    return [str(p) for p in prefixes]  # type: ignore[attr-defined]


def free_index(allocator: PoolAllocator) -> list[tuple[int, int]]:
    """The free-space index as sorted (address, length) pairs."""
    return sorted((v, length) for length, vs in enumerate(allocator._free) for v in vs)


# -- allocation order: IPv4/IPv6 twin rows ----------------------------------------------------

ORDER = [
    # (id, pool, policy, lengths asked, expected prefixes)
    (
        "v6-lowest-sequential",
        "2001:db8::/48",
        {},
        [64, 64, 64],
        ["2001:db8::/64", "2001:db8:0:1::/64", "2001:db8:0:2::/64"],
    ),
    (
        "v4-lowest-sequential",
        "10.0.0.0/16",
        {},
        [24, 24, 24],
        ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"],
    ),
    (
        "v6-lowest-mixed-sizes-fill-the-hole-first",
        "2001:db8::/48",
        {},
        [64, 56, 64],
        ["2001:db8::/64", "2001:db8:0:100::/56", "2001:db8:0:1::/64"],
    ),
    (
        "v4-lowest-mixed-sizes-fill-the-hole-first",
        "10.0.0.0/16",
        {},
        [24, 20, 24],
        ["10.0.0.0/24", "10.0.16.0/20", "10.0.1.0/24"],
    ),
    (
        "v6-best-fit-keeps-big-blocks",
        "2001:db8::/48",
        {"strategy": Strategy.BEST_FIT},
        [56, 64, 60],
        ["2001:db8::/56", "2001:db8:0:100::/64", "2001:db8:0:110::/60"],
    ),
    (
        "v4-best-fit-keeps-big-blocks",
        "10.0.0.0/16",
        {"strategy": Strategy.BEST_FIT},
        [20, 24, 22],
        ["10.0.0.0/20", "10.0.16.0/24", "10.0.20.0/22"],
    ),
    (
        "v6-reserved-skipped",
        "2001:db8::/48",
        {"reserved": ["2001:db8::/64"]},
        [64, 60],
        ["2001:db8:0:1::/64", "2001:db8:0:10::/60"],
    ),
    (
        "v4-reserved-skipped",
        "10.0.0.0/16",
        {"reserved": ["10.0.0.0/24"]},
        [24, 20],
        ["10.0.1.0/24", "10.0.16.0/20"],
    ),
    (
        "v6-address-pool-skips-anycast",
        "2001:db8::/120",
        {"reserve_anycast": True},
        [128, 128],
        ["2001:db8::1/128", "2001:db8::2/128"],
    ),
    (
        "v4-address-pool-skips-network-address",
        "192.0.2.0/24",
        {"reserve_anycast": True},
        [32, 32],
        ["192.0.2.1/32", "192.0.2.2/32"],
    ),
    (
        "v6-whole-pool",
        "2001:db8::/64",
        {},
        [64],
        ["2001:db8::/64"],
    ),
    (
        "v4-whole-space",
        "0.0.0.0/0",
        {},
        [0],
        ["0.0.0.0/0"],
    ),
]


@pytest.mark.parametrize(
    ("cidr", "policy", "lengths", "expected"),
    [row[1:] for row in ORDER],
    ids=[row[0] for row in ORDER],
)
def test_allocation_order(
    cidr: str, policy: dict[str, object], lengths: list[int], expected: list[str]
) -> None:
    """Each strategy hands out prefixes in its documented order, skipping reserved space."""
    allocator = pool(cidr, alignment_bits=1, **policy)
    assert texts(allocator.allocate(n) for n in lengths) == expected
    assert texts(allocator.allocations()) == sorted(expected, key=parse_prefix)


def test_anycast_reservation_covers_rfc2526_top_128() -> None:
    """An IPv6 address pool reserves the subnet-router anycast and the top 128 addresses."""
    allocator = pool("2001:db8:0:1::/64", reserve_anycast=True)
    assert texts(allocator.reserved) == [
        "2001:db8:0:1::/128",
        "2001:db8:0:1:ffff:ffff:ffff:ff80/121",
    ]
    assert not allocator.is_free(parse_prefix("2001:db8:0:1:ffff:ffff:ffff:ffff/128"))
    assert allocator.is_free(parse_prefix("2001:db8:0:1:ffff:ffff:ffff:ff7f/128"))
    usage = allocator.usage()
    assert usage.reserved == 129
    assert usage.free == 2**64 - 129


@pytest.mark.parametrize(
    ("cidr", "reserved"),
    [
        ("2001:db8::/126", ["2001:db8::/128"]),
        ("2001:db8::/127", []),
        ("2001:db8::/128", []),
        ("10.0.0.0/30", ["10.0.0.0/32", "10.0.0.3/32"]),
        ("10.0.0.0/31", []),
    ],
)
def test_anycast_reservation_on_tiny_subnets(cidr: str, reserved: list[str]) -> None:
    """Point-to-point subnets (/127, /31) and single addresses reserve nothing."""
    assert texts(pool(cidr, reserve_anycast=True, alignment_bits=1).reserved) == reserved


# -- exact allocation and conflicts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "held", "asked", "conflicts"),
    [
        ("2001:db8::/48", ["2001:db8::/64"], "2001:db8::/64", ["2001:db8::/64"]),
        ("10.0.0.0/16", ["10.0.0.0/24"], "10.0.0.0/24", ["10.0.0.0/24"]),
        ("2001:db8::/48", ["2001:db8::/56"], "2001:db8:0:10::/60", ["2001:db8::/56"]),
        ("10.0.0.0/16", ["10.0.0.0/20"], "10.0.2.0/24", ["10.0.0.0/20"]),
        (
            "2001:db8::/48",
            ["2001:db8:0:1::/64", "2001:db8:0:3::/64"],
            "2001:db8::/60",
            ["2001:db8:0:1::/64", "2001:db8:0:3::/64"],
        ),
        (
            "10.0.0.0/16",
            ["10.0.1.0/24", "10.0.3.0/24"],
            "10.0.0.0/20",
            ["10.0.1.0/24", "10.0.3.0/24"],
        ),
    ],
    ids=[
        "v6-same",
        "v4-same",
        "v6-inside-held",
        "v4-inside-held",
        "v6-covers-two",
        "v4-covers-two",
    ],
)
def test_exact_allocation_conflicts_name_the_holders(
    cidr: str, held: list[str], asked: str, conflicts: list[str]
) -> None:
    """An exact request overlapping held prefixes fails, naming them, and changes nothing."""
    allocator = pool(cidr, alignment_bits=1)
    for h in held:
        allocator.allocate_prefix(parse_prefix(h))
    before = free_index(allocator)
    with pytest.raises(PrefixConflictError) as info:
        allocator.allocate_prefix(parse_prefix(asked))
    assert texts(info.value.conflicts) == conflicts
    assert info.value.kind is ErrorKind.CONFLICT
    assert free_index(allocator) == before
    assert len(allocator) == len(held)


def test_exact_allocation_conflict_with_reserved_range() -> None:
    """A request over a reserved range names the range and says it is reserved."""
    allocator = pool("2001:db8::/48", reserved=["2001:db8:0:ff::/64"])
    with pytest.raises(PrefixConflictError, match="held or reserved") as info:
        allocator.allocate_prefix(parse_prefix("2001:db8:0:f0::/60"))
    assert texts(info.value.conflicts) == ["2001:db8:0:ff::/64"]


def test_conflict_list_is_bounded() -> None:
    """A request covering thousands of holders names only the first eight."""
    allocator = pool("10.0.0.0/16", alignment_bits=1)
    allocator.allocate_many([32] * 4096)
    with pytest.raises(PrefixConflictError) as info:
        allocator.allocate_prefix(parse_prefix("10.0.0.0/16"))
    assert texts(info.value.conflicts) == [f"10.0.0.{i}/32" for i in range(8)]


def test_exact_allocation_outside_pool_and_wrong_family() -> None:
    """Exact prefixes must be inside the pool and of its family."""
    allocator = pool("2001:db8::/48")
    with pytest.raises(PolicyViolationError, match="not inside pool"):
        allocator.allocate_prefix(parse_prefix("2001:db9::/64"))
    with pytest.raises(PolicyViolationError, match="not inside pool"):
        allocator.allocate_prefix(parse_prefix("2001:db8::/32"))
    with pytest.raises(InvalidPrefixError, match="is IPv4"):
        allocator.allocate_prefix(parse_prefix("10.0.0.0/8"))


def test_exact_allocation_in_the_middle_splits_free_space() -> None:
    """Holding a prefix in the middle leaves the space around it free and allocatable."""
    allocator = pool("2001:db8::/48")
    allocator.allocate_prefix(parse_prefix("2001:db8:0:8000::/64"))
    assert texts(allocator.allocate(52) for _ in range(2)) == [
        "2001:db8::/52",
        "2001:db8:0:1000::/52",
    ]
    assert allocator.usage().largest_free == parse_prefix("2001:db8:0:4000::/50")


# -- policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "policy", "length", "words"),
    [
        (
            "2001:db8::/48",
            {},
            62,
            "not on a 4-bit boundary, which pool 2001:db8::/48 requires; ask for /60 or /64",
        ),
        ("2001:db8::/48", {}, 44, "cannot come from the pool"),
        ("2001:db8::/48", {}, 132, "cannot come from the pool"),
        ("10.0.0.0/16", {}, 8, "cannot come from the pool"),
        ("2001:db8::/48", {"min_length": 56, "max_length": 64}, 52, "lengths from /56 to /64"),
        ("2001:db8::/48", {"min_length": 56, "max_length": 64}, 80, "lengths from /56 to /64"),
        ("10.0.0.0/16", {"min_length": 20, "max_length": 28}, 30, "lengths from /20 to /28"),
        ("10.0.0.0/16", {"alignment_bits": 4}, 22, "ask for /20 or /24"),
        ("2001:db8::/48", {"max_length": 62}, 61, "ask for /60."),
        ("2001:db8::/48", {}, None, "no default length"),
        ("2001:db8::/48", {}, "64", "must be an integer"),
        ("2001:db8::/48", {}, True, "must be an integer"),
    ],
)
def test_policy_refuses_lengths(
    cidr: str, policy: dict[str, object], length: object, words: str
) -> None:
    """Lengths outside the pool, the policy's range or its alignment are refused clearly."""
    allocator = pool(cidr, **policy)
    with pytest.raises(PolicyViolationError) as info:
        allocator.allocate(length)  # type: ignore[arg-type]
    assert words in str(info.value)
    assert info.value.kind is ErrorKind.INVALID


def test_default_length_is_used() -> None:
    """A request without a length takes the policy's default."""
    allocator = pool("2001:db8::/48", default_length=56)
    assert str(allocator.allocate()) == "2001:db8::/56"
    assert str(allocator.next_free()) == "2001:db8:0:100::/56"


@pytest.mark.parametrize(
    ("cidr", "policy", "error", "words"),
    [
        ("2001:db8::/48", {"min_length": 40}, PolicyViolationError, "min_length"),
        ("2001:db8::/48", {"min_length": 64, "max_length": 56}, PolicyViolationError, "min_length"),
        ("10.0.0.0/8", {"max_length": 33}, PolicyViolationError, "max_length"),
        ("2001:db8::/48", {"default_length": 62}, PolicyViolationError, "default_length"),
        ("2001:db8::/48", {"default_length": 40}, PolicyViolationError, "default_length"),
        ("2001:db8::/48", {"alignment_bits": 0}, PolicyViolationError, "alignment_bits"),
        ("10.0.0.0/8", {"alignment_bits": 33}, PolicyViolationError, "alignment_bits"),
        ("2001:db8::/48", {"reserved": ["2001:db9::/64"]}, PolicyViolationError, "not inside pool"),
        ("2001:db8::/48", {"reserved": ["10.0.0.0/8"]}, InvalidPrefixError, "is IPv4"),
    ],
)
def test_policy_is_checked_against_the_pool(
    cidr: str, policy: dict[str, object], error: type[EngineError], words: str
) -> None:
    """A policy that contradicts itself or its pool is refused when the allocator is built."""
    with pytest.raises(error, match=words):
        pool(cidr, **policy)


def test_overlapping_reserved_ranges_are_merged() -> None:
    """Reserved ranges inside other reserved ranges are counted once."""
    allocator = pool(
        "2001:db8::/48", reserved=["2001:db8::/56", "2001:db8::/64", "2001:db8:0:1::/64"]
    )
    assert texts(allocator.reserved) == ["2001:db8::/56"]
    assert allocator.usage().reserved == 2**72


# -- exhaustion and round trips ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "length", "count", "strategy"),
    [
        ("2001:db8::/56", 64, 256, Strategy.LOWEST),
        ("10.0.0.0/16", 24, 256, Strategy.LOWEST),
        ("2001:db8::/56", 64, 256, Strategy.BEST_FIT),
        ("10.0.0.0/16", 24, 256, Strategy.BEST_FIT),
        ("2001:db8::/120", 128, 256, Strategy.LOWEST),
        ("10.0.0.0/24", 32, 256, Strategy.BEST_FIT),
    ],
)
def test_fill_exhaust_release_all_round_trip(
    cidr: str, length: int, count: int, strategy: Strategy
) -> None:
    """Filling a pool, hitting exhaustion and releasing everything returns the empty state."""
    allocator = pool(cidr, strategy=strategy, alignment_bits=1)
    empty = free_index(allocator)
    got = [allocator.allocate(length) for _ in range(count)]
    assert len(set(got)) == count
    assert allocator.usage().free == 0
    with pytest.raises(PoolExhaustedError, match="nothing is free") as info:
        allocator.allocate(length)
    assert info.value.kind is ErrorKind.EXHAUSTED
    assert info.value.largest_free is None
    for prefix in reversed(got[::2]):
        allocator.release(prefix)
    for prefix in got[1::2]:
        allocator.release(prefix)
    assert free_index(allocator) == empty
    assert len(allocator) == 0
    assert allocator.usage().fragmentation == 0.0


def test_exhaustion_names_largest_free_block() -> None:
    """When only small blocks remain, the error names the largest one."""
    allocator = pool("2001:db8::/56", alignment_bits=1)
    allocator.allocate_prefix(parse_prefix("2001:db8::/57"))
    allocator.allocate_prefix(parse_prefix("2001:db8:0:80::/58"))
    with pytest.raises(PoolExhaustedError) as info:
        allocator.allocate(56)
    assert str(info.value.largest_free) == "2001:db8:0:c0::/58"
    assert "2001:db8:0:c0::/58" in str(info.value)
    with pytest.raises(PoolExhaustedError):
        allocator.next_free(56)


# -- batches -----------------------------------------------------------------------------------


def test_allocate_many_is_all_or_nothing() -> None:
    """A batch that cannot be served whole leaves the pool exactly as it was."""
    allocator = pool("2001:db8::/60")
    allocator.allocate(64)
    before = free_index(allocator)
    with pytest.raises(PoolExhaustedError) as info:
        allocator.allocate_many([64] * 16)
    assert info.value.batch_index == 15
    assert free_index(allocator) == before
    assert len(allocator) == 1


def test_allocate_many_mixes_lengths_and_exact_prefixes() -> None:
    """A batch may mix lengths, exact prefixes and the default, served in order."""
    allocator = pool("2001:db8::/48", default_length=64)
    got = allocator.allocate_many([parse_prefix("2001:db8::/64"), 64, None, 56])
    assert texts(got) == [
        "2001:db8::/64",
        "2001:db8:0:1::/64",
        "2001:db8:0:2::/64",
        "2001:db8:0:100::/56",
    ]


def test_allocate_many_conflict_rolls_back_and_reports_position() -> None:
    """An exact prefix that conflicts later in the batch undoes the earlier ones."""
    allocator = pool("10.0.0.0/16", alignment_bits=1)
    with pytest.raises(PrefixConflictError) as info:
        allocator.allocate_many([24, parse_prefix("10.0.1.0/24"), parse_prefix("10.0.0.0/24")])
    assert info.value.batch_index == 2
    assert len(allocator) == 0
    assert allocator.usage().free == 2**16


def test_allocate_many_dry_run_holds_nothing() -> None:
    """A dry run answers what would be held and keeps nothing."""
    allocator = pool("2001:db8::/48")
    preview = allocator.allocate_many([64, 64, 56], dry_run=True)
    assert len(allocator) == 0
    assert allocator.allocate_many([64, 64, 56]) == preview


# -- release -----------------------------------------------------------------------------------


def test_release_of_free_or_foreign_prefix_is_not_found() -> None:
    """Releasing what is not held exactly is an error of kind NOT_FOUND."""
    allocator = pool("2001:db8::/48")
    held = allocator.allocate(64)
    for other in ["2001:db8:0:1::/64", "2001:db8::/60", "2001:db8::/80", "10.0.0.0/8"]:
        with pytest.raises(NotAllocatedError) as info:
            allocator.release(parse_prefix(other))
        assert info.value.kind is ErrorKind.NOT_FOUND
    allocator.release(held)
    with pytest.raises(NotAllocatedError):
        allocator.release(held)


def test_release_many_is_all_or_nothing() -> None:
    """release_many releases nothing if any prefix is not held or is named twice."""
    allocator = pool("2001:db8::/48")
    a, b = allocator.allocate(64), allocator.allocate(64)
    with pytest.raises(NotAllocatedError):
        allocator.release_many([a, parse_prefix("2001:db8:0:5::/64")])
    with pytest.raises(NotAllocatedError):
        allocator.release_many([a, a])
    assert len(allocator) == 2
    allocator.release_many([a, b])
    assert len(allocator) == 0


def test_released_space_is_reused_lowest_first() -> None:
    """After a release the lowest strategy hands the freed prefix out again first."""
    allocator = pool("10.0.0.0/16", alignment_bits=1)
    got = [allocator.allocate(24) for _ in range(4)]
    allocator.release(got[1])
    assert allocator.allocate(24) == got[1]


# -- occupy (replaying the source of truth) ----------------------------------------------------


def test_occupy_is_idempotent_and_ignores_policy_lengths() -> None:
    """occupy() holds a prefix once, returns False when it is already held, and skips lengths."""
    allocator = pool("2001:db8::/48", min_length=64, max_length=64)
    odd = parse_prefix("2001:db8::/62")
    assert allocator.occupy(odd) is True
    assert allocator.occupy(odd) is False
    assert odd in allocator
    with pytest.raises(PrefixConflictError):
        allocator.occupy(parse_prefix("2001:db8::/64"))
    with pytest.raises(PolicyViolationError):
        allocator.occupy(parse_prefix("2001:db9::/64"))


# -- building from existing allocations --------------------------------------------------------


@pytest.mark.parametrize("strategy", list(Strategy))
def test_build_from_allocations_equals_incremental_state(strategy: Strategy) -> None:
    """An allocator built from a list of held prefixes equals one that allocated them."""
    live = pool("2001:db8::/48", strategy=strategy, reserved=["2001:db8:0:ff00::/64"])
    got = [live.allocate(n) for n in (64, 56, 60, 64, 52, 64)]
    live.release(got[1])
    live.release(got[4])
    held = [p for i, p in enumerate(got) if i not in (1, 4)]
    built = PoolAllocator(live.cidr, live.policy, reversed(held))
    assert free_index(built) == free_index(live)
    assert built.usage() == live.usage()
    assert built.allocations() == live.allocations()
    assert built.allocate(64) == live.allocate(64)


@pytest.mark.parametrize(
    ("held", "words"),
    [
        (["2001:db8::/64", "2001:db8::/64"], "overlaps the allocation 2001:db8::/64"),
        (["2001:db8::/56", "2001:db8:0:10::/64"], "overlaps the allocation 2001:db8::/56"),
        (["2001:db8:0:ff::/64"], "overlaps the reserved range"),
    ],
)
def test_build_refuses_overlaps(held: list[str], words: str) -> None:
    """Building from overlapping allocations, or ones over reserved space, is a conflict."""
    with pytest.raises(PrefixConflictError, match=words):
        PoolAllocator(
            parse_prefix("2001:db8::/48"),
            Policy(reserved=(parse_prefix("2001:db8:0:ff::/64"),)),
            [parse_prefix(h) for h in held],
        )


def test_build_refuses_allocations_outside_the_pool() -> None:
    """Every allocation must lie inside the pool."""
    with pytest.raises(PolicyViolationError, match="not inside pool"):
        PoolAllocator(parse_prefix("10.0.0.0/16"), None, [parse_prefix("10.1.0.0/24")])


# -- queries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "held", "address", "expected"),
    [
        ("2001:db8::/48", ["2001:db8:0:1::/64"], "2001:db8:0:1::9", "2001:db8:0:1::/64"),
        ("2001:db8::/48", ["2001:db8:0:1::/64"], "2001:db8:0:2::9", None),
        ("2001:db8::/48", ["2001:db8:0:1::/64"], "10.0.0.1", None),
        ("10.0.0.0/16", ["10.0.1.0/24"], "10.0.1.9", "10.0.1.0/24"),
        ("10.0.0.0/16", ["10.0.1.0/24"], "10.0.2.9", None),
        ("10.0.0.0/16", ["10.0.1.0/24"], "10.9.0.1", None),
    ],
)
def test_lookup_finds_the_holding_allocation(
    cidr: str, held: list[str], address: str, expected: str | None
) -> None:
    """lookup() answers which held prefix contains an address, or None."""
    allocator = pool(cidr, alignment_bits=1)
    for h in held:
        allocator.allocate_prefix(parse_prefix(h))
    found = allocator.lookup(parse_address(address))
    assert (str(found) if found else None) == expected


def test_is_free_and_contains() -> None:
    """is_free() is true only for wholly free space inside the pool; `in` is exact holding."""
    allocator = pool("2001:db8::/48", reserved=["2001:db8:0:ff::/64"])
    held = allocator.allocate_prefix(parse_prefix("2001:db8:0:10::/60"))
    assert held in allocator
    assert parse_prefix("2001:db8:0:10::/64") not in allocator
    assert "2001:db8:0:10::/60" not in allocator
    assert parse_prefix("10.0.0.0/8") not in allocator
    assert allocator.is_free(parse_prefix("2001:db8::/60"))
    assert not allocator.is_free(parse_prefix("2001:db8::/56"))
    assert not allocator.is_free(parse_prefix("2001:db8:0:ff::/64"))
    assert not allocator.is_free(parse_prefix("2001:db9::/64"))
    assert not allocator.is_free(parse_prefix("10.0.0.0/8"))
    assert repr(allocator) == "PoolAllocator(2001:db8::/48, allocations=1)"


def test_available_lists_free_prefixes_in_address_order() -> None:
    """available() lists the first free prefixes of a length, in address order."""
    allocator = pool("2001:db8::/56")
    for text in ["2001:db8::/64", "2001:db8:0:2::/63", "2001:db8:0:10::/60"]:
        allocator.occupy(parse_prefix(text))
    assert texts(allocator.available(64, 5)) == [
        "2001:db8:0:1::/64",
        "2001:db8:0:4::/64",
        "2001:db8:0:5::/64",
        "2001:db8:0:6::/64",
        "2001:db8:0:7::/64",
    ]
    assert texts(allocator.available(60, 2)) == ["2001:db8:0:20::/60", "2001:db8:0:30::/60"]
    assert allocator.available(64, 0) == []
    assert len(allocator.available(56)) == 0
    assert len(allocator.available(64, 1000)) == 256 - 1 - 2 - 16
    with pytest.raises(PolicyViolationError, match="limit"):
        allocator.available(64, -1)


def test_available_survives_stale_heap_entries() -> None:
    """Free blocks merged away out of heap order are compacted and never listed."""
    allocator = pool("10.0.0.0/18", alignment_bits=1)
    got = [allocator.allocate(28) for _ in range(1024)]
    for p in got[::2]:  # 512 separate free /28s: their buddies are held
        allocator.release(p)
    for p in reversed(got[1::2][32:]):  # merge from the top: entries below the heap top go stale
        allocator.release(p)
    assert len(allocator._heap[28]) <= 2 * len(allocator._free[28]) + 64
    expected = got[:64:2]
    listed = allocator.available(28, 2000)
    assert listed[:32] == expected
    assert len(listed) == 32 + 1024 - 64
    assert allocator.allocate(28) == expected[0]


def test_conflict_walk_is_bounded_on_huge_gaps() -> None:
    """Naming conflicts across the whole IPv6 space stops after a bounded walk."""
    allocator = pool("::/0")
    ends = ["::/128", "7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "8000::/128"]
    for text in [*ends, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]:
        allocator.occupy(parse_prefix(text))
    with pytest.raises(PrefixConflictError) as info:
        allocator.allocate_prefix(parse_prefix("::/0"))
    assert texts(info.value.conflicts) == ends


def test_usage_counts_exactly() -> None:
    """usage() reports exact address counts, free blocks, largest block and fragmentation."""
    allocator = pool("2001:db8::/48", reserved=["2001:db8:0:ffff::/64"])
    allocator.allocate(64)
    allocator.allocate(56)
    usage = allocator.usage(64)
    assert usage.total == 2**80
    assert usage.allocated == 2**64 + 2**72
    assert usage.reserved == 2**64
    assert usage.free == 2**80 - 2 * 2**64 - 2**72
    assert usage.allocations == 2
    assert usage.free_blocks == 2**16 - 2 - 256
    assert str(usage.largest_free) == "2001:db8:0:4000::/50"
    assert usage.fragmentation == pytest.approx(1 - 2**78 / usage.free)
    assert usage.utilization == pytest.approx(usage.allocated / (2**80 - 2**64))
    with pytest.raises(PolicyViolationError):
        allocator.usage(40)


def test_usage_of_a_full_pool() -> None:
    """A pool with nothing free reports no largest block and full utilization."""
    allocator = pool("10.0.0.0/24", reserved=["10.0.0.0/24"])
    usage = allocator.usage(32)
    assert usage.largest_free is None
    assert usage.free == 0
    assert usage.free_blocks == 0
    assert usage.fragmentation == 0.0
    assert usage.utilization == 1.0


def test_generation_is_the_services_to_keep() -> None:
    """Generation starts at 0 and is stored as set; the engine never changes it."""
    allocator = pool("2001:db8::/48")
    assert allocator.generation == 0
    allocator.generation = 7
    allocator.allocate(64)
    assert allocator.generation == 7
