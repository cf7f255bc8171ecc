"""kipam's allocation engine: pure, in-memory, radix-tree prefix allocation.

No I/O, no asyncio, no clock, no randomness, no logging: state in, decision out. The
service builds one :class:`PoolAllocator` per pool from the source of truth and feeds it
every change; the engine decides which prefixes to hand out.

    >>> from engine import PoolAllocator, Policy, parse_prefix
    >>> pool = PoolAllocator(parse_prefix("2001:db8::/48"), Policy(default_length=64))
    >>> str(pool.allocate())
    '2001:db8::/64'
"""

from __future__ import annotations

from engine._prefix import Prefix, parse_address, parse_prefix
from engine.allocator import Policy, PoolAllocator, Strategy, Usage
from engine.errors import (
    ClusterCheckError,
    EngineError,
    ErrorKind,
    InvalidError,
    InvalidPrefixError,
    NotAllocatedError,
    PolicyViolationError,
    PoolExhaustedError,
    PreconditionError,
    PrefixConflictError,
    Violation,
)

__all__ = [
    "ClusterCheckError",
    "EngineError",
    "ErrorKind",
    "InvalidError",
    "InvalidPrefixError",
    "NotAllocatedError",
    "Policy",
    "PolicyViolationError",
    "PoolAllocator",
    "PoolExhaustedError",
    "PreconditionError",
    "Prefix",
    "PrefixConflictError",
    "Strategy",
    "Usage",
    "Violation",
    "parse_address",
    "parse_prefix",
]
