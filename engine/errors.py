"""Errors raised by the engine, each carrying the kind of failure as a hint for the transports.

The engine imports no transport, so every error says *what kind* of failure it is and the
service maps kinds to gRPC status codes and HTTP statuses in one table (DESIGN.md, "Errors")::

    EngineError                      (abstract; never raised itself)
    +-- InvalidError                 kind INVALID       bad input: fix the request
    |   +-- InvalidPrefixError       text that is not a usable prefix or address
    |   +-- PolicyViolationError     a valid prefix the pool's policy does not allow
    |   +-- ClusterCheckError        a Kubernetes/Cilium rule would be broken (see engine.cluster)
    +-- NotAllocatedError            kind NOT_FOUND     release/lookup of something not held
    +-- PrefixConflictError          kind CONFLICT      overlaps something held or reserved
    +-- PoolExhaustedError           kind EXHAUSTED     no free block of the asked length
    +-- PreconditionError            kind PRECONDITION  the pool's state forbids the change

Messages are full sentences meant for the person who sent the request: they say what is
wrong and, where one exists, what would be accepted instead.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from collections.abc import Sequence

    from engine._prefix import Prefix

__all__ = [
    "ClusterCheckError",
    "EngineError",
    "ErrorKind",
    "InvalidError",
    "InvalidPrefixError",
    "NotAllocatedError",
    "PolicyViolationError",
    "PoolExhaustedError",
    "PreconditionError",
    "PrefixConflictError",
    "Violation",
]


class ErrorKind(enum.Enum):
    """What kind of failure an error is; the service maps each kind to a gRPC and HTTP status."""

    INVALID = "invalid"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    EXHAUSTED = "exhausted"
    PRECONDITION = "precondition"


class EngineError(Exception):
    """Base of every engine error. Abstract: raise one of the subclasses."""

    kind: ClassVar[ErrorKind]

    def __init__(self, message: str) -> None:
        if type(self) in _ABSTRACT:
            raise TypeError(f"{type(self).__name__} is abstract; raise a subclass")
        super().__init__(message)
        self.message = message
        # In an all-or-nothing batch: the position of the request that failed.
        self.batch_index: int | None = None


class InvalidError(EngineError):
    """The request is malformed or not allowed as asked. Abstract."""

    kind = ErrorKind.INVALID


class InvalidPrefixError(InvalidError):
    """Text that is not a usable prefix or address: garbage, host bits, zone id, wrong family."""

    def __init__(self, message: str, *, text: object = None) -> None:
        super().__init__(message)
        self.text = text


class PolicyViolationError(InvalidError):
    """A well-formed request that the pool's policy does not allow (length, alignment, range)."""


class Violation:
    """One broken Kubernetes/Cilium rule: which rule, what is wrong, and where the rule comes from.

    Attributes:
        rule: A short stable identifier, e.g. ``node-mask-diff``.
        message: A full sentence with the numbers involved and what would satisfy the rule.
        reference: The upstream source the rule mirrors (file and constant, or RFC section).
    """

    __slots__ = ("message", "reference", "rule")

    def __init__(self, rule: str, message: str, reference: str) -> None:
        self.rule = rule
        self.message = message
        self.reference = reference

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Violation):
            return NotImplemented
        return (self.rule, self.message, self.reference) == (
            other.rule,
            other.message,
            other.reference,
        )

    def __hash__(self) -> int:
        return hash((self.rule, self.message, self.reference))

    def __repr__(self) -> str:
        return f"Violation(rule={self.rule!r}, message={self.message!r})"


class ClusterCheckError(InvalidError):
    """One or more Kubernetes/Cilium rules would be broken; ``violations`` lists every one."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        if not violations:
            raise ValueError("ClusterCheckError needs at least one violation")
        super().__init__(" ".join(v.message for v in violations))
        self.violations = tuple(violations)


class NotAllocatedError(EngineError):
    """The prefix is not held in this pool (release or exact lookup of something free)."""

    kind = ErrorKind.NOT_FOUND

    def __init__(self, message: str, *, prefix: Prefix) -> None:
        super().__init__(message)
        self.prefix = prefix


class PrefixConflictError(EngineError):
    """The prefix overlaps held allocations or reserved ranges; ``conflicts`` names them."""

    kind = ErrorKind.CONFLICT

    def __init__(
        self,
        message: str,
        *,
        prefix: Prefix,
        conflicts: Sequence[Prefix] = (),
    ) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.conflicts = tuple(conflicts)


class PoolExhaustedError(EngineError):
    """No free block of the asked length is left in the pool."""

    kind = ErrorKind.EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        pool: Prefix,
        length: int,
        largest_free: Prefix | None,
    ) -> None:
        super().__init__(message)
        self.pool = pool
        self.length = length
        self.largest_free = largest_free


class PreconditionError(EngineError):
    """The pool's current state forbids the change (e.g. reserving a range that is held)."""

    kind = ErrorKind.PRECONDITION


_ABSTRACT = (EngineError, InvalidError)
