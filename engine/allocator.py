"""The pool allocator: one long-lived object per pool, deciding which prefixes to hand out.

Theory of operation
-------------------
A pool is one CIDR. Every address in it is in exactly one of three states: *held* (inside an
allocation), *reserved* (inside a reserved range of the policy) or *free*. Two indexes keep
this partition:

* the **allocated index**, a pytricia radix tree keyed by the held prefixes, whose value is
  the prefix length (a small int, shared by CPython, so it costs no memory per entry). It
  answers exact lookups (release) and longest-prefix matches (who holds this address).
* the **free-space index**, the free addresses written as *maximal aligned blocks*: the
  unique set of CIDRs that covers the free space exactly and in which no two blocks are
  buddies (the two halves of one larger CIDR). Because aligned blocks nest, any aligned
  prefix that is entirely free lies inside exactly one of these blocks. Blocks are kept per
  length ``l`` in a set (membership) and a binary heap (lowest address first), plus
  ``_min[l]``, the lowest address of that length or :data:`_EMPTY`.

Rules that keep the free-space index canonical (every method below keeps them):

1. Taking a /L out of a free block /b (b <= L) removes the block and frees, for each length
   from b+1 to L, the half that does not contain the /L. Those halves' buddies are not
   free, so the index stays maximal.
2. Freeing a /L adds it and merges it with its buddy while the buddy is a free block of the
   same length, climbing one bit at a time, never above the pool.
3. The top of every heap is a live block (stale entries below the top are skipped lazily
   and compacted when they outnumber live ones), so ``_min`` is exact.

With W address bits, allocation and release cost O(W) set and heap operations (each
O(log n)), independent of how many addresses the pool holds: the address space is never
enumerated, and there is no per-address bitmap and no 64-bit offset anywhere.

The allocator is pure: no I/O, clock, randomness or logging. The service owns persistence,
and keeps ``generation`` equal to the pool row's generation while this object is trusted.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import pytricia

from engine._prefix import Prefix, parse_prefix
from engine.errors import (
    EngineError,
    InvalidPrefixError,
    NotAllocatedError,
    PolicyViolationError,
    PoolExhaustedError,
    PrefixConflictError,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

__all__ = ["Policy", "PoolAllocator", "Strategy", "Usage"]

_EMPTY: Final = 1 << 129  # larger than any address: "no free block of this length"
# How many conflicts an error names. Finding them walks the free index from the request's
# first address; the walk is bounded too, so a refusal never costs more than a few µs.
_MAX_CONFLICTS: Final = 8
_MAX_CONFLICT_STEPS: Final = 256
# Stale heap entries are compacted once they outnumber live ones by this slack.
_COMPACT_SLACK: Final = 64


class Strategy(enum.Enum):
    """How the next free prefix is chosen."""

    LOWEST = "lowest"
    """First fit by address: the lowest free prefix of the asked length."""
    BEST_FIT = "best_fit"
    """The lowest prefix inside the smallest free block that fits: least fragmentation."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What a pool may hand out. Lengths not given default to the pool's own limits.

    Attributes:
        default_length: Length used when a request names none; None means requests must.
        min_length: Shortest (largest) prefix handed out; default the pool's own length.
        max_length: Longest (smallest) prefix handed out; default 32 or 128.
        alignment_bits: Handed-out lengths must be multiples of this. None means 4 (nibble
            boundaries: one ip6.arpa zone per prefix, RFC 3596) for IPv6 and 1 (any) for IPv4.
        strategy: :class:`Strategy` for choosing the next free prefix.
        reserved: Ranges inside the pool that are never handed out.
        reserve_anycast: For pools of addresses: never hand out the subnet-router anycast
            address (the first, RFC 4291 section 2.6.1) nor the top 128 addresses (RFC 2526
            subnet anycast) of an IPv6 pool; for IPv4, the network and broadcast addresses.
    """

    default_length: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    alignment_bits: int | None = None
    strategy: Strategy = Strategy.LOWEST
    reserved: tuple[Prefix, ...] = ()
    reserve_anycast: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """How full a pool is. Address counts are exact integers (an IPv6 /0 has 2**128).

    Attributes:
        total: Addresses in the pool.
        allocated: Addresses inside held allocations.
        reserved: Addresses inside reserved ranges.
        free: Addresses neither held nor reserved.
        allocations: Number of held allocations.
        length: The length ``free_blocks`` counts, or None.
        free_blocks: How many /``length`` prefixes could still be handed out (0 if no length).
        largest_free: The largest free aligned block (lowest address among equals), or None.
        fragmentation: 1 - largest free block / free addresses: 0.0 when the free space is one
            block (or there is none), approaching 1.0 as it splinters.
    """

    total: int
    allocated: int
    reserved: int
    free: int
    allocations: int
    length: int | None
    free_blocks: int
    largest_free: Prefix | None
    fragmentation: float = field(default=0.0)

    @property
    def utilization(self) -> float:
        """Held share of the addresses that could ever be handed out (0.0 to 1.0)."""
        usable = self.total - self.reserved
        return self.allocated / usable if usable else 1.0


class PoolAllocator:
    """Allocator for one pool: decides which prefixes to hand out, never twice at once.

    Build it from the pool's CIDR, its policy and the prefixes already held (read from the
    source of truth), then keep it and feed it every change. Methods that change state either
    complete or raise with the state unchanged.

    Args:
        cidr: The pool.
        policy: Its :class:`Policy`; default allows any aligned length inside the pool.
        allocations: Prefixes already held (active or quarantined). They are trusted as they
            are (policy lengths are not applied: the policy may have changed since), but each
            must lie inside the pool and overlap neither another nor a reserved range.

    Raises:
        PolicyViolationError: the policy contradicts itself or the pool.
        InvalidPrefixError: an allocation or reserved range is of the wrong family.
        PrefixConflictError: allocations overlap each other or a reserved range.
    """

    __slots__ = (
        "_align",
        "_allocated",
        "_bits",
        "_default",
        "_free",
        "_heap",
        "_max",
        "_min",
        "_min_len",
        "_nbytes",
        "_policy",
        "_pool",
        "_reserved",
        "_reserved_size",
        "_reserved_tree",
        "_tree",
        "generation",
    )

    def __init__(
        self,
        cidr: Prefix,
        policy: Policy | None = None,
        allocations: Iterable[Prefix] = (),
    ) -> None:
        self._pool = cidr
        self._policy = policy = policy or Policy()
        self._bits = bits = cidr.bits
        self._nbytes = bits // 8
        self._align, self._min_len, self._max, self._default = _resolve_policy(cidr, policy)
        self._reserved = _resolve_reserved(cidr, policy)
        self._reserved_size = sum(r.size for r in self._reserved)
        self._reserved_tree: pytricia.PyTricia[int] = pytricia.PyTricia(bits)
        for r in self._reserved:
            self._reserved_tree.insert(self._key(r.value, r.length), r.length)
        self._tree: pytricia.PyTricia[int] = pytricia.PyTricia(bits)
        self._free: list[set[int]] = [set() for _ in range(bits + 1)]
        self._heap: list[list[int]] = [[] for _ in range(bits + 1)]
        self._min: list[int] = [_EMPTY] * (bits + 1)
        self._allocated = 0
        self.generation = 0
        """The pool row's generation this object reflects; set and read by the service only."""
        self._build(allocations)

    # -- properties -----------------------------------------------------------------------------

    @property
    def cidr(self) -> Prefix:
        """The pool's own prefix."""
        return self._pool

    @property
    def policy(self) -> Policy:
        """The policy as given."""
        return self._policy

    @property
    def reserved(self) -> tuple[Prefix, ...]:
        """Reserved ranges in effect (the policy's, plus anycast ones), merged and sorted."""
        return self._reserved

    def __len__(self) -> int:
        """Number of held allocations."""
        return len(self._tree)

    def __contains__(self, prefix: object) -> bool:
        """Whether ``prefix`` is held exactly (as one allocation)."""
        return (
            isinstance(prefix, Prefix)
            and prefix.version == self._pool.version
            and self._tree.has_key(self._key(prefix.value, prefix.length))
        )

    def __repr__(self) -> str:
        return f"PoolAllocator({self._pool}, allocations={len(self)})"

    # -- allocating -----------------------------------------------------------------------------

    def allocate(self, length: int | None = None) -> Prefix:
        """Hold the next free prefix of ``length`` bits, chosen by the policy's strategy.

        Args:
            length: Prefix length; None takes the policy's default length.

        Returns:
            The prefix now held.

        Raises:
            PolicyViolationError: no length and no default, or a length the policy refuses.
            PoolExhaustedError: no free block of that length is left.
        """
        length = self._check_length(length)
        found = self._find(length)
        if found is None:
            raise self._exhausted(length)
        value, block_length = found
        self._take(value, block_length, value, length)
        return Prefix(self._pool.version, value, length)

    def next_free(self, length: int | None = None) -> Prefix:
        """The prefix :meth:`allocate` would hand out now, without holding it (a dry run).

        Raises:
            PolicyViolationError: as :meth:`allocate`.
            PoolExhaustedError: as :meth:`allocate`.
        """
        length = self._check_length(length)
        found = self._find(length)
        if found is None:
            raise self._exhausted(length)
        return Prefix(self._pool.version, found[0], length)

    def allocate_prefix(self, prefix: Prefix) -> Prefix:
        """Hold exactly ``prefix``, which must be free and allowed by the policy.

        Raises:
            PolicyViolationError: outside the pool, or a length the policy refuses.
            InvalidPrefixError: the wrong address family.
            PrefixConflictError: it overlaps a held allocation or a reserved range; the error
                names them (up to eight, in address order).
        """
        self._check_inside(prefix)
        self._check_length(prefix.length)
        self._claim(prefix)
        return prefix

    def occupy(self, prefix: Prefix) -> bool:
        """Hold ``prefix`` as the source of truth says it is held; idempotent.

        Used to replay changes into a long-lived allocator. Policy lengths are not applied
        (the database is the truth), only the pool bounds and the overlap rules.

        Returns:
            True if the prefix was free and is now held, False if it was already held exactly.

        Raises:
            PolicyViolationError: outside the pool.
            InvalidPrefixError: the wrong address family.
            PrefixConflictError: it overlaps some other held allocation or a reserved range.
        """
        self._check_inside(prefix)
        if self._tree.has_key(self._key(prefix.value, prefix.length)):
            return False
        self._claim(prefix)
        return True

    def allocate_many(
        self,
        requests: Sequence[int | Prefix | None],
        *,
        dry_run: bool = False,
    ) -> list[Prefix]:
        """Hold one prefix per request, all or nothing.

        Each request is a length (the next free prefix of it), an exact :class:`Prefix`, or
        None (the default length). They are served in order.

        Args:
            requests: What to hold.
            dry_run: Compute the answer, then give everything back: nothing stays held.

        Returns:
            The prefixes held, one per request, in request order.

        Raises:
            EngineError: the first request that fails, with ``batch_index`` set to its
                position; everything held for earlier requests has been released again.
        """
        done: list[Prefix] = []
        try:
            for index, request in enumerate(requests):
                try:
                    if isinstance(request, Prefix):
                        done.append(self.allocate_prefix(request))
                    else:
                        done.append(self.allocate(request))
                except EngineError as exc:
                    exc.batch_index = index
                    raise
        except BaseException:
            self._undo(done)
            raise
        if dry_run:
            self._undo(done)
        return done

    # -- releasing ------------------------------------------------------------------------------

    def release(self, prefix: Prefix) -> None:
        """Give back a held prefix; its space merges into the free index at once.

        Quarantine is the service's business: it calls this only when the prefix may be
        handed out again.

        Raises:
            NotAllocatedError: ``prefix`` is not held exactly (releasing twice is an error, so
                that a caller's bookkeeping mistake is seen rather than hidden).
        """
        key = (
            self._key(prefix.value, prefix.length) if prefix.version == self._pool.version else None
        )
        if key is None or not self._tree.has_key(key):
            raise NotAllocatedError(f"{prefix} is not held in pool {self._pool}.", prefix=prefix)
        self._tree.delete(key)
        self._allocated -= prefix.size
        self._free_block(prefix.value, prefix.length)

    def release_many(self, prefixes: Iterable[Prefix]) -> None:
        """Release several prefixes, all or nothing.

        Raises:
            NotAllocatedError: one of them is not held (then none is released).
        """
        prefixes = list(prefixes)
        seen: set[Prefix] = set()
        for p in prefixes:
            if p not in self or p in seen:
                raise NotAllocatedError(f"{p} is not held in pool {self._pool}.", prefix=p)
            seen.add(p)
        for p in prefixes:
            self.release(p)

    # -- queries --------------------------------------------------------------------------------

    def is_free(self, prefix: Prefix) -> bool:
        """Whether every address of ``prefix`` is inside the pool and neither held nor reserved."""
        return (
            self._pool.contains(prefix)
            and self._free_block_of(prefix.value, prefix.length) is not None
        )

    def lookup(self, address: Prefix) -> Prefix | None:
        """The held allocation containing ``address`` (any prefix: its first address counts).

        Returns:
            The allocation, or None if the address is free, reserved or outside the pool.
        """
        if address.version != self._pool.version:
            return None
        length = self._tree.get(self._key(address.value, self._bits))
        if length is None:
            return None
        shift = self._bits - length
        return Prefix(self._pool.version, (address.value >> shift) << shift, length)

    def allocations(self) -> list[Prefix]:
        """Every held prefix, in address order. O(n): for inspection and tests, not hot paths."""
        return sorted(_parse_key(k, self._pool.version) for k in self._tree.keys())  # noqa: SIM118 - pytricia iterates keys only through keys()

    def available(self, length: int | None = None, limit: int = 100) -> list[Prefix]:
        """The first ``limit`` free prefixes of ``length`` bits, in address order.

        These are the prefixes :meth:`allocate_prefix` would accept now; with the ``lowest``
        strategy the first one is also what :meth:`allocate` would choose.

        Raises:
            PolicyViolationError: a length the policy refuses, or a negative limit.
        """
        length = self._check_length(length)
        if limit < 0:
            raise PolicyViolationError(f"limit must be at least 0, not {limit}.")
        out: list[Prefix] = []
        if limit == 0:
            return out
        version = self._pool.version
        step = 1 << (self._bits - length)
        streams = [
            self._ordered(block)
            for block in range(self._pool.length, length + 1)
            if self._free[block]
        ]
        for value, block in heapq.merge(*streams):
            end = value + (1 << (self._bits - block))
            for sub in range(value, end, step):
                out.append(Prefix(version, sub, length))
                if len(out) == limit:
                    return out
        return out

    def usage(self, length: int | None = None) -> Usage:
        """How full the pool is; ``length`` also counts the free prefixes of that length.

        Costs O(W), whatever the number of allocations.
        """
        if length is not None and not self._pool.length <= length <= self._bits:
            raise PolicyViolationError(
                f"A /{length} cannot come from the pool {self._pool}; "
                f"ask for a length from /{self._pool.length} to /{self._bits}."
            )
        total = self._pool.size
        free = total - self._allocated - self._reserved_size
        largest: Prefix | None = None
        for block in range(self._pool.length, self._bits + 1):
            if self._free[block]:
                largest = Prefix(self._pool.version, self._min[block], block)
                break
        blocks = 0
        if length is not None:
            blocks = sum(
                len(self._free[block]) << (length - block)
                for block in range(self._pool.length, length + 1)
            )
        fragmentation = 0.0 if largest is None else 1.0 - largest.size / free
        return Usage(
            total=total,
            allocated=self._allocated,
            reserved=self._reserved_size,
            free=free,
            allocations=len(self._tree),
            length=length,
            free_blocks=blocks,
            largest_free=largest,
            fragmentation=fragmentation,
        )

    # -- validation -----------------------------------------------------------------------------

    def _check_length(self, length: int | None) -> int:
        if length is None:
            if self._default is None:
                raise PolicyViolationError(
                    f"Pool {self._pool} has no default length; name the prefix length to allocate."
                )
            return self._default
        if isinstance(length, bool) or not isinstance(length, int):
            raise PolicyViolationError(f"A prefix length must be an integer, not {length!r}.")
        if self._min_len <= length <= self._max and length % self._align == 0:
            return length
        if not self._pool.length <= length <= self._bits:
            raise PolicyViolationError(
                f"A /{length} cannot come from the pool {self._pool}; "
                f"ask for a length from /{self._min_len} to /{self._max}."
            )
        if not self._min_len <= length <= self._max:
            raise PolicyViolationError(
                f"Pool {self._pool} hands out lengths from /{self._min_len} to /{self._max}, "
                f"not /{length}."
            )
        lower = length - length % self._align
        upper = lower + self._align
        choices = " or ".join(f"/{n}" for n in (lower, upper) if self._min_len <= n <= self._max)
        raise PolicyViolationError(
            f"/{length} is not on a {self._align}-bit boundary, which pool {self._pool} requires"
            + (f"; ask for {choices}." if choices else ".")
        )

    def _check_inside(self, prefix: Prefix) -> None:
        if prefix.version != self._pool.version:
            raise InvalidPrefixError(
                f"{prefix} is IPv{prefix.version}; pool {self._pool} is IPv{self._pool.version}.",
                text=str(prefix),
            )
        if not self._pool.contains(prefix):
            raise PolicyViolationError(f"{prefix} is not inside pool {self._pool}.")

    def _exhausted(self, length: int) -> PoolExhaustedError:
        largest = self.usage().largest_free
        detail = (
            f"the largest free block is {largest}" if largest is not None else "nothing is free"
        )
        return PoolExhaustedError(
            f"Pool {self._pool} has no free /{length} left; {detail}.",
            pool=self._pool,
            length=length,
            largest_free=largest,
        )

    # -- the free-space index -------------------------------------------------------------------

    def _key(self, value: int, length: int) -> tuple[bytes, int]:
        return (value.to_bytes(self._nbytes, "big"), length)

    def _find(self, length: int) -> tuple[int, int] | None:
        """The (block address, block length) to cut a /length from, or None."""
        mins = self._min
        low = self._pool.length
        if self._policy.strategy is Strategy.BEST_FIT:
            for block in range(length, low - 1, -1):
                if mins[block] != _EMPTY:
                    return mins[block], block
            return None
        # Lowest address among all blocks that fit. Blocks are disjoint, so the lowest block
        # start is the lowest free prefix; min() over a slice runs at C speed.
        best = min(mins[low : length + 1])
        if best == _EMPTY:
            return None
        return best, mins.index(best, low, length + 1)

    def _add(self, value: int, length: int) -> None:
        self._free[length].add(value)
        heapq.heappush(self._heap[length], value)
        self._min[length] = min(self._min[length], value)

    def _remove(self, value: int, length: int) -> None:
        live = self._free[length]
        live.remove(value)
        heap = self._heap[length]
        if not live:
            heap.clear()
            self._min[length] = _EMPTY
            return
        if value == heap[0]:
            heapq.heappop(heap)
            while heap[0] not in live:  # a live block always remains below: `live` is not empty
                heapq.heappop(heap)
            self._min[length] = heap[0]
        elif len(heap) > 2 * len(live) + _COMPACT_SLACK:
            heap[:] = live
            heapq.heapify(heap)

    def _take(self, block: int, block_length: int, value: int, length: int) -> None:
        """Hold /length at ``value``, cut from the free block /block_length at ``block``."""
        self._remove(block, block_length)
        bits = self._bits
        for sub in range(block_length + 1, length + 1):
            half = 1 << (bits - sub)
            # The half of this level that does not contain the prefix becomes a free block.
            self._add((value & ~(half * 2 - 1)) | (~value & half), sub)
        self._tree.insert(self._key(value, length), length)
        self._allocated += 1 << (bits - length)

    def _free_block(self, value: int, length: int) -> None:
        """Return /length at ``value`` to the free index, merging with free buddies."""
        low = self._pool.length
        free = self._free
        bits = self._bits
        while length > low:
            buddy = value ^ (1 << (bits - length))
            if buddy not in free[length]:
                break
            self._remove(buddy, length)
            value &= ~(1 << (bits - length))
            length -= 1
        self._add(value, length)

    def _free_block_of(self, value: int, length: int) -> tuple[int, int] | None:
        """The free block containing /length at ``value``, as (address, length), or None."""
        bits = self._bits
        free = self._free
        for block in range(self._pool.length, length + 1):
            start = (value >> (bits - block)) << (bits - block)
            if start in free[block]:
                return start, block
        return None

    def _claim(self, prefix: Prefix) -> None:
        found = self._free_block_of(prefix.value, prefix.length)
        if found is None:
            raise self._conflict(prefix)
        self._take(found[0], found[1], prefix.value, prefix.length)

    def _conflict(self, prefix: Prefix) -> PrefixConflictError:
        conflicts: list[Prefix] = []
        reserved = False
        version = self._pool.version
        address = prefix.value
        for _ in range(_MAX_CONFLICT_STEPS):
            if address > prefix.last or len(conflicts) == _MAX_CONFLICTS:
                break
            block = self._free_block_of(address, self._bits)
            if block is not None:
                address = block[0] + (1 << (self._bits - block[1]))
                continue
            key = self._key(address, self._bits)
            length = self._tree.get(key)
            if length is None:
                length = self._reserved_tree.get(key)
                reserved = True
            if length is None:  # pragma: no cover - the three indexes partition the pool
                raise AssertionError(f"{address:#x} is neither free, held nor reserved")
            shift = self._bits - length
            held = Prefix(version, (address >> shift) << shift, length)
            conflicts.append(held)
            address = held.last + 1
        names = ", ".join(str(c) for c in conflicts)
        what = "held or reserved prefixes" if reserved else "held prefixes"
        return PrefixConflictError(
            f"{prefix} overlaps {what} in pool {self._pool}: {names}.",
            prefix=prefix,
            conflicts=conflicts,
        )

    def _ordered(self, length: int) -> Iterator[tuple[int, int]]:
        """Live free blocks of one length as (address, length), ascending, heap unchanged.

        Walks the heap as the tree it is: pop the smallest index, push its two children.
        Costs O(k log k) for the first k, skipping stale and duplicate entries.
        """
        heap = self._heap[length]
        live = self._free[length]
        frontier = [(heap[0], 0)] if heap else []
        last = -1
        while frontier:
            value, index = heapq.heappop(frontier)
            if value in live and value != last:
                last = value
                yield value, length
            for child in (2 * index + 1, 2 * index + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))

    def _undo(self, done: list[Prefix]) -> None:
        for prefix in reversed(done):
            self.release(prefix)

    def _build(self, allocations: Iterable[Prefix]) -> None:
        """Load held prefixes and derive the free space as the gaps between everything taken."""
        pool = self._pool
        held: list[Prefix] = []
        for prefix in allocations:
            self._check_inside(prefix)
            held.append(prefix)
        taken = sorted([*held, *self._reserved], key=_start)
        reserved = set(self._reserved)
        cursor = pool.value
        previous: Prefix | None = None
        for prefix in taken:
            if previous is not None and prefix.value <= previous.last:
                pair = sorted((previous, prefix))
                what = "reserved range" if reserved.intersection(pair) else "allocation"
                raise PrefixConflictError(
                    f"{pair[1]} overlaps the {what} {pair[0]} in pool {pool}.",
                    prefix=pair[1],
                    conflicts=[pair[0]],
                )
            self._add_range(cursor, prefix.value - 1)
            cursor = prefix.last + 1
            previous = prefix
        self._add_range(cursor, pool.last)
        insert = self._tree.insert
        for prefix in held:
            insert(self._key(prefix.value, prefix.length), prefix.length)
            self._allocated += prefix.size

    def _add_range(self, first: int, last: int) -> None:
        """Add the free addresses first..last (inclusive) as maximal aligned blocks."""
        bits = self._bits
        while first <= last:
            align = (first & -first).bit_length() - 1 if first else bits
            fit = (last - first + 1).bit_length() - 1
            size_bits = min(align, fit)
            self._add(first, bits - size_bits)
            first += 1 << size_bits


def _start(prefix: Prefix) -> int:
    return prefix.value


def _parse_key(text: str, version: int) -> Prefix:
    prefix = parse_prefix(text)
    if prefix.version != version:  # pragma: no cover - a tree holds one family
        raise AssertionError(text)
    return prefix


def _resolve_policy(cidr: Prefix, policy: Policy) -> tuple[int, int, int, int | None]:
    """Check the policy against the pool; return (alignment, min, max, default) in effect."""
    bits = cidr.bits
    align = policy.alignment_bits
    if align is None:
        align = 4 if cidr.version == 6 else 1
    if not 1 <= align <= bits:
        raise PolicyViolationError(f"alignment_bits must be from 1 to {bits}, not {align}.")
    low = cidr.length if policy.min_length is None else policy.min_length
    high = bits if policy.max_length is None else policy.max_length
    if not cidr.length <= low <= high <= bits:
        raise PolicyViolationError(
            f"Pool {cidr} needs {cidr.length} <= min_length <= max_length <= {bits}; "
            f"got min_length {low} and max_length {high}."
        )
    default = policy.default_length
    if default is not None and not (low <= default <= high and default % align == 0):
        raise PolicyViolationError(
            f"default_length /{default} must be from /{low} to /{high} and a multiple of "
            f"{align} for pool {cidr}."
        )
    return align, low, high, default


def _resolve_reserved(cidr: Prefix, policy: Policy) -> tuple[Prefix, ...]:
    """The reserved ranges in effect: inside the pool, contained ones dropped, sorted."""
    ranges = list(policy.reserved)
    for r in ranges:
        if r.version != cidr.version:
            raise InvalidPrefixError(
                f"Reserved range {r} is IPv{r.version}; pool {cidr} is IPv{cidr.version}.",
                text=str(r),
            )
        if not cidr.contains(r):
            raise PolicyViolationError(f"Reserved range {r} is not inside pool {cidr}.")
    if policy.reserve_anycast:
        ranges.extend(_anycast_ranges(cidr))
    merged: list[Prefix] = []
    for r in sorted(ranges):  # a containing prefix sorts before what it contains
        if merged and merged[-1].contains(r):
            continue
        merged.append(r)
    return tuple(merged)


def _anycast_ranges(cidr: Prefix) -> list[Prefix]:
    """Addresses of a subnet that must not be given to a host.

    IPv6: the subnet-router anycast address (RFC 4291 section 2.6.1) for subnets of /126 or
    shorter (a /127 is a point-to-point link, RFC 6164), and the top 128 interface
    identifiers reserved for subnet anycast (RFC 2526 section 2) for subnets of /120 or shorter.
    IPv4: network and broadcast for /30 or shorter (RFC 3021 lets /31 use both).
    """
    out: list[Prefix] = []
    if cidr.version == 6:
        if cidr.length <= 126:
            out.append(Prefix(6, cidr.value, 128))
        if cidr.length <= 120:
            out.append(Prefix(6, cidr.last - 127, 121))
    elif cidr.length <= 30:
        out.extend((Prefix(4, cidr.value, 32), Prefix(4, cidr.last, 32)))
    return out
