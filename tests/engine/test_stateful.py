"""The allocator against a brute-force model built on the standard ``ipaddress`` module.

The model keeps every address of a small pool (256 of them) as a set and answers each
question by enumeration: slow, obviously right, and independent of the engine's radix tree
and free-space index. Pools sit at the bottom, the middle and the very top of each family's
space, so 128-bit carries and the last address are exercised.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine import (
    NotAllocatedError,
    Policy,
    PoolAllocator,
    PoolExhaustedError,
    Prefix,
    PrefixConflictError,
    Strategy,
    parse_prefix,
)

POOLS = [
    "2001:db8::/120",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120",
    "::/120",
    "10.0.0.0/24",
    "255.255.255.0/24",
    "0.0.0.0/24",
]


class Model:
    """Every address of the pool as an int, with the held and reserved ones marked."""

    def __init__(self, pool: Prefix, reserved: list[Prefix]) -> None:
        self.pool = pool
        self.held: set[Prefix] = set()
        self.reserved_addresses = {a for r in reserved for a in range(r.value, r.last + 1)}

    def taken(self) -> set[int]:
        """Addresses held or reserved."""
        held = {a for p in self.held for a in range(p.value, p.last + 1)}
        return held | self.reserved_addresses

    def free(self) -> set[int]:
        """Addresses neither held nor reserved."""
        return set(range(self.pool.value, self.pool.last + 1)) - self.taken()

    def is_free(self, prefix: Prefix) -> bool:
        """Whether every address of the prefix is free."""
        free = self.free()
        return all(a in free for a in range(prefix.value, prefix.last + 1))

    def candidates(self, length: int) -> list[Prefix]:
        """Every wholly free, aligned /length in the pool, in address order."""
        step = 1 << (self.pool.bits - length)
        free = self.free()
        return [
            Prefix(self.pool.version, start, length)
            for start in range(self.pool.value, self.pool.last + 1, step)
            if all(a in free for a in range(start, start + step))
        ]

    def block_length(self, prefix: Prefix) -> int:
        """Length of the largest free aligned block containing a free prefix."""
        length = prefix.length
        while length > self.pool.length and self.is_free(prefix.supernet(length - 1)):
            length -= 1
        return length

    def choose(self, length: int, strategy: Strategy) -> Prefix | None:
        """The prefix a strategy must pick, by enumeration, or None when nothing fits."""
        found = self.candidates(length)
        if not found:
            return None
        if strategy is Strategy.LOWEST:
            return found[0]
        return min(found, key=lambda p: (-self.block_length(p), p.value))

    def holder(self, address: int) -> Prefix | None:
        """The held prefix containing the address, by linear search."""
        for p in self.held:
            if p.value <= address <= p.last:
                return p
        return None


def inside(pool: Prefix, offset: int, length: int) -> Prefix:
    """The /length inside the pool that contains the pool's address number ``offset``."""
    shift = pool.bits - length
    return Prefix(pool.version, ((pool.value + offset) >> shift) << shift, length)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / allocate-exact / batch / release / lookup / usage steps."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator: PoolAllocator
        self.model: Model
        self.strategy = Strategy.LOWEST

    @initialize(
        cidr=st.sampled_from(POOLS),
        strategy=st.sampled_from(Strategy),
        alignment=st.sampled_from([1, 2, 4]),
        reserved=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 8)), max_size=3),
        anycast=st.booleans(),
    )
    def setup(
        self,
        cidr: str,
        strategy: Strategy,
        alignment: int,
        reserved: list[tuple[int, int]],
        anycast: bool,
    ) -> None:
        """A pool from POOLS with a random strategy, alignment and reserved ranges."""
        pool = parse_prefix(cidr)
        ranges = [inside(pool, offset, pool.length + 8 - size) for offset, size in reserved]
        self.strategy = strategy
        self.allocator = PoolAllocator(
            pool,
            Policy(
                strategy=strategy,
                alignment_bits=alignment,
                reserved=tuple(ranges),
                reserve_anycast=anycast,
            ),
        )
        self.model = Model(pool, list(self.allocator.reserved))

    def lengths(self) -> st.SearchStrategy[int]:
        """Lengths the policy allows, up to 8 bits below the pool."""
        low = self.model.pool.length
        align = self.allocator._align
        return st.sampled_from([n for n in range(low, low + 9) if n % align == 0])

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        """The next free prefix is the one the model picks, or both say the pool is full."""
        length = data.draw(self.lengths())
        expected = self.model.choose(length, self.strategy)
        if expected is None:
            with pytest.raises(PoolExhaustedError):
                self.allocator.allocate(length)
            return
        assert self.allocator.next_free(length) == expected
        assert self.allocator.allocate(length) == expected
        self.model.held.add(expected)

    @rule(offset=st.integers(0, 255), data=st.data())
    def allocate_exact(self, offset: int, data: st.DataObject) -> None:
        """An exact prefix is held iff wholly free; a conflict names real holders, first first."""
        prefix = inside(self.model.pool, offset, data.draw(self.lengths()))
        if self.model.is_free(prefix):
            assert self.allocator.allocate_prefix(prefix) == prefix
            self.model.held.add(prefix)
            return
        with pytest.raises(PrefixConflictError) as info:
            self.allocator.allocate_prefix(prefix)
        conflicts = info.value.conflicts
        assert conflicts
        for conflict in conflicts:
            assert prefix.overlaps(conflict)
            span = range(conflict.value, conflict.last + 1)
            assert conflict in self.model.held or all(
                a in self.model.reserved_addresses for a in span
            )
        taken = self.model.taken()
        first = min(a for a in range(prefix.value, prefix.last + 1) if a in taken)
        assert conflicts[0].value <= first <= conflicts[0].last

    @rule(data=st.data())
    def allocate_many(self, data: st.DataObject) -> None:
        """A batch is served whole as the model serves it, or fails at the model's position."""
        lengths = data.draw(st.lists(self.lengths(), min_size=1, max_size=6))
        dry_run = data.draw(st.booleans())
        before = set(self.model.held)
        expected: list[Prefix] = []
        for length in lengths:
            choice = self.model.choose(length, self.strategy)
            if choice is None:
                break
            expected.append(choice)
            self.model.held.add(choice)
        self.model.held = before
        if len(expected) < len(lengths):
            with pytest.raises(PoolExhaustedError) as info:
                self.allocator.allocate_many(lengths, dry_run=dry_run)
            assert info.value.batch_index == len(expected)
            return
        assert self.allocator.allocate_many(lengths, dry_run=dry_run) == expected
        if not dry_run:
            self.model.held.update(expected)

    @precondition(lambda self: self.model.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Any held prefix can be released."""
        prefix = data.draw(st.sampled_from(sorted(self.model.held)))
        self.allocator.release(prefix)
        self.model.held.remove(prefix)

    @rule(offset=st.integers(0, 255), data=st.data())
    def release_unheld(self, offset: int, data: st.DataObject) -> None:
        """Releasing a prefix that is not held exactly is refused."""
        prefix = inside(self.model.pool, offset, data.draw(self.lengths()))
        if prefix in self.model.held:
            return
        with pytest.raises(NotAllocatedError):
            self.allocator.release(prefix)

    @rule(offset=st.integers(0, 255))
    def lookup(self, offset: int) -> None:
        """Lookups name the holder the model finds."""
        pool = self.model.pool
        address = Prefix(pool.version, pool.value + offset, pool.bits)
        assert self.allocator.lookup(address) == self.model.holder(address.value)

    @rule(data=st.data())
    def usage_and_available(self, data: st.DataObject) -> None:
        """Free-block counts and available() match the model's enumeration."""
        length = data.draw(self.lengths())
        found = self.model.candidates(length)
        usage = self.allocator.usage(length)
        assert usage.free_blocks == len(found)
        assert self.allocator.available(length, 1000) == found
        limit = data.draw(st.integers(0, 4))
        assert self.allocator.available(length, limit) == found[:limit]

    @invariant()
    def agrees_with_model(self) -> None:
        """Held, reserved and free partition the pool, exactly as the model says."""
        allocator, model = self.allocator, self.model
        held = allocator.allocations()
        assert held == sorted(model.held)
        for a, b in itertools.pairwise(held):
            assert a.last < b.value, f"{a} overlaps {b}"
        free = model.free()
        usage = allocator.usage()
        assert usage.total == model.pool.size
        assert usage.allocated == sum(p.size for p in model.held)
        assert usage.reserved == len(model.reserved_addresses)
        assert usage.free == len(free)
        assert usage.allocations == len(model.held)
        # The free-space index covers the free addresses exactly, in maximal blocks.
        bits = model.pool.bits
        blocks = [(v, n) for n, values in enumerate(allocator._free) for v in values]
        covered = [a for v, n in blocks for a in range(v, v + (1 << (bits - n)))]
        assert sorted(covered) == sorted(free)
        keys = set(blocks)
        for v, n in blocks:
            assert (v ^ (1 << (bits - n)), n) not in keys, "two free buddies"
        if usage.largest_free is None:
            assert not free
        else:
            assert model.is_free(usage.largest_free)
            assert usage.largest_free.length == min(n for _, n in blocks)


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocator = AllocatorMachine.TestCase


def test_model_matches_ipaddress() -> None:
    """The model's own candidates agree with ipaddress.subnets() on an empty pool."""
    pool = parse_prefix("2001:db8::/120")
    model = Model(pool, [])
    subnets = list(ipaddress.IPv6Network("2001:db8::/120").subnets(new_prefix=124))
    assert [p.to_network() for p in model.candidates(124)] == subnets
