from __future__ import annotations

import pytest

from engine import (
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
    parse_prefix,
)


@pytest.mark.parametrize("abstract", [EngineError, InvalidError])
def test_abstract_errors_cannot_be_raised(abstract: type[EngineError]) -> None:
    """The error bases are abstract: only specific errors can be raised."""
    with pytest.raises(TypeError, match="abstract"):
        abstract("boom")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidPrefixError("x"), ErrorKind.INVALID),
        (PolicyViolationError("x"), ErrorKind.INVALID),
        (ClusterCheckError([Violation("r", "m", "ref")]), ErrorKind.INVALID),
        (NotAllocatedError("x", prefix=parse_prefix("::/0")), ErrorKind.NOT_FOUND),
        (PrefixConflictError("x", prefix=parse_prefix("::/0")), ErrorKind.CONFLICT),
        (
            PoolExhaustedError("x", pool=parse_prefix("::/0"), length=1, largest_free=None),
            ErrorKind.EXHAUSTED,
        ),
        (PreconditionError("x"), ErrorKind.PRECONDITION),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, EngineError) else str(v),
)
def test_every_error_carries_its_kind(error: EngineError, kind: ErrorKind) -> None:
    """Each error class names the kind the transports map to a status."""
    assert error.kind is kind
    assert error.batch_index is None
    assert isinstance(error.message, str)


def test_cluster_check_error_joins_violations() -> None:
    """A cluster check error keeps every violation and says them all."""
    violations = [Violation("a", "First.", "ref a"), Violation("b", "Second.", "ref b")]
    error = ClusterCheckError(violations)
    assert error.violations == tuple(violations)
    assert str(error) == "First. Second."
    with pytest.raises(ValueError, match="at least one"):
        ClusterCheckError([])


def test_violations_compare_by_value() -> None:
    """Violations are values: equal fields mean equal and same hash."""
    a = Violation("rule", "message", "reference")
    assert a == Violation("rule", "message", "reference")
    assert hash(a) == hash(Violation("rule", "message", "reference"))
    assert a != Violation("rule", "other", "reference")
    assert a != "rule"
    assert repr(a) == "Violation(rule='rule', message='message')"
