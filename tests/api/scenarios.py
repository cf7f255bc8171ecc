"""The API scenario table: one story of calls, each with the outcome it must have.

Run in order against an empty server by each transport's driver (gRPC now, REST later):
``args`` may name an earlier step's answer with :class:`Ref`; ``expect`` is None for
success or the error kind the call must fail with; ``check`` looks at a successful answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.errors import Kind

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SCENARIO", "Ref", "Step", "arguments"]

SITE = {"default_length": 64, "quarantine_seconds": 0, "allow_documentation": True}
TINY = {"default_length": 127, "alignment_bits": 1, "allow_documentation": True}


@dataclass(frozen=True)
class Ref:
    """An attribute of an earlier step's answer (``Ref("alloc-a", "id")``)."""

    step: str
    attr: str


@dataclass(frozen=True)
class Step:
    """One call of the story."""

    id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    expect: Kind | None = None
    check: Callable[[Any], bool] | None = None
    grpc_only: str | None = None  # why the step has no REST twin


def arguments(step: Step, answers: dict[str, Any]) -> dict[str, Any]:
    """The step's arguments, each :class:`Ref` replaced by what it names."""

    def value(v: Any) -> Any:
        if not isinstance(v, Ref):
            return v
        answer = answers[v.step]
        return getattr(answer[0] if isinstance(answer, tuple) else answer, v.attr)

    return {k: value(v) for k, v in step.args.items()}


def _prefix(text: str) -> Callable[[Any], bool]:
    return lambda answer: str(answer[0].prefix) == text


SCENARIO: tuple[Step, ...] = (
    # -- pools
    Step(
        "create-site",
        "create_pool",
        {"name": "site", "cidr": "2001:db8::/48", "policy": SITE},
        check=lambda a: str(a[0].cidr) == "2001:db8::/48" and a[0].role == "container" and a[1],
    ),
    Step(
        "create-child",
        "create_pool",
        {"name": "site/pod", "parent": "site", "prefix_length": 56, "role": "pod"},
        check=lambda a: str(a[0].cidr) == "2001:db8::/56" and a[0].parent == "site",
    ),
    Step(
        "create-keyed",
        "create_pool",
        {"name": "keyed", "cidr": "2001:db8:4::/48", "policy": SITE, "idempotency_key": "p1"},
        check=lambda a: a[1],
    ),
    Step(
        "create-keyed-retry",
        "create_pool",
        {"name": "keyed", "cidr": "2001:db8:4::/48", "policy": SITE, "idempotency_key": "p1"},
        check=lambda a: not a[1] and str(a[0].cidr) == "2001:db8:4::/48",
    ),
    Step(
        "create-key-reused-differently",
        "create_pool",
        {"name": "keyed2", "cidr": "2001:db8:5::/48", "policy": SITE, "idempotency_key": "p1"},
        expect=Kind.CONFLICT,
    ),
    Step(
        "create-subresource-name",
        "create_pool",
        {"name": "site/usage", "parent": "site", "prefix_length": 56},
        expect=Kind.INVALID,
    ),
    Step(
        "create-site-again",
        "create_pool",
        {"name": "site", "cidr": "2001:db8:1::/48", "policy": SITE},
        expect=Kind.CONFLICT,
    ),
    Step(
        "create-overlapping-root",
        "create_pool",
        {"name": "other", "cidr": "2001:db8:0:ff00::/56", "policy": SITE},
        expect=Kind.CONFLICT,
    ),
    Step(
        "create-bad-name",
        "create_pool",
        {"name": "Bad Name!", "cidr": "2001:db8:9::/48"},
        expect=Kind.INVALID,
    ),
    Step(
        "create-documentation-refused",
        "create_pool",
        {"name": "doc", "cidr": "2001:db8:9::/48"},
        expect=Kind.INVALID,
    ),
    Step("create-no-cidr", "create_pool", {"name": "nocidr"}, expect=Kind.INVALID),
    Step(
        "create-missing-parent",
        "create_pool",
        {"name": "x/y", "parent": "nope", "prefix_length": 64},
        expect=Kind.NOT_FOUND,
    ),
    Step("get-site", "get_pool", {"name": "site"}, check=lambda pool: pool.name == "site"),
    Step("get-missing", "get_pool", {"name": "missing"}, expect=Kind.NOT_FOUND),
    # -- allocate by length, exact, idempotent retry
    Step(
        "alloc-a",
        "allocate",
        {"pool": "site", "owner": "node/a", "length": 64},
        check=lambda a: str(a[0].prefix) == "2001:db8:0:100::/64" and a[1],
    ),
    Step(
        "alloc-default-length",
        "allocate",
        {"pool": "site", "owner": "node/d"},
        check=_prefix("2001:db8:0:101::/64"),
    ),
    Step(
        "alloc-exact",
        "allocate",
        {"pool": "site", "owner": "node/b", "prefix": "2001:db8:0:8000::/64"},
        check=_prefix("2001:db8:0:8000::/64"),
    ),
    Step(
        "alloc-exact-taken",
        "allocate",
        {"pool": "site", "owner": "node/c", "prefix": "2001:db8:0:8000::/64"},
        expect=Kind.CONFLICT,
    ),
    Step(
        "alloc-exact-inside-child",
        "allocate",
        {"pool": "site", "owner": "node/c", "prefix": "2001:db8::/64"},
        expect=Kind.CONFLICT,
    ),
    Step(
        "alloc-key",
        "allocate",
        {"pool": "site", "owner": "node/k", "length": 64, "idempotency_key": "k1"},
        check=lambda a: a[1] and str(a[0].prefix) == "2001:db8:0:102::/64",
    ),
    Step(
        "alloc-key-retry",
        "allocate",
        {"pool": "site", "owner": "node/k", "length": 64, "idempotency_key": "k1"},
        check=lambda a: not a[1] and str(a[0].prefix) == "2001:db8:0:102::/64",
    ),
    Step(
        "alloc-key-reused-differently",
        "allocate",
        {"pool": "site", "owner": "node/other", "length": 64, "idempotency_key": "k1"},
        expect=Kind.CONFLICT,
    ),
    Step(
        "alloc-dry-run",
        "allocate",
        {"pool": "site", "owner": "node/dry", "length": 64, "dry_run": True},
        check=lambda a: a[0].id == 0 and str(a[0].prefix) == "2001:db8:0:103::/64",
    ),
    Step(
        "alloc-batch",
        "allocate_many",
        {"pool": "site", "owners": ["node/m1", "node/m2", "node/m3"], "length": 64},
        check=lambda answers: (
            [str(a.prefix) for a, _ in answers]
            == ["2001:db8:0:103::/64", "2001:db8:0:104::/64", "2001:db8:0:105::/64"]
        ),
    ),
    # -- malformed allocations
    Step(
        "alloc-absurd-length",
        "allocate",
        {"pool": "site", "owner": "node/x", "length": 200},
        expect=Kind.INVALID,
    ),
    Step(
        "alloc-negative-length",
        "allocate",
        {"pool": "site", "owner": "node/x", "length": -1},
        expect=Kind.INVALID,
    ),
    Step(
        "alloc-wrong-family",
        "allocate",
        {"pool": "site", "owner": "node/x", "prefix": "10.0.0.0/24"},
        expect=Kind.INVALID,
    ),
    Step(
        "alloc-garbage-prefix",
        "allocate",
        {"pool": "site", "owner": "node/x", "prefix": "2001:db8::zz/64"},
        expect=Kind.INVALID,
    ),
    Step(
        "alloc-outside-pool",
        "allocate",
        {"pool": "site", "owner": "node/x", "prefix": "2001:db9::/64"},
        expect=Kind.INVALID,
    ),
    Step(
        "alloc-no-owner",
        "allocate",
        {"pool": "site", "owner": "", "length": 64},
        expect=Kind.INVALID,
    ),
    Step(
        "alloc-missing-pool",
        "allocate",
        {"pool": "nope", "owner": "node/x", "length": 64},
        expect=Kind.NOT_FOUND,
    ),
    # -- exhausted
    Step(
        "create-tiny",
        "create_pool",
        {"name": "tiny", "cidr": "2001:db8:ffff::/126", "policy": TINY},
    ),
    Step("tiny-1", "allocate", {"pool": "tiny", "owner": "vip/1"}),
    Step("tiny-2", "allocate", {"pool": "tiny", "owner": "vip/2"}),
    Step("tiny-exhausted", "allocate", {"pool": "tiny", "owner": "vip/3"}, expect=Kind.EXHAUSTED),
    # -- lookup, usage, release
    Step(
        "lookup",
        "lookup",
        {"address": "2001:db8:0:8000::5"},
        check=lambda found: [a.owner for a in found] == ["node/b"],
    ),
    Step(
        "lookup-nested",
        "lookup",
        {"address": "2001:db8::1"},
        check=lambda found: (
            [a.pool for a in found] == ["site"] and found[0].owner.startswith("pool/")
        ),
    ),
    Step("lookup-garbage", "lookup", {"address": "not-an-address"}, expect=Kind.INVALID),
    Step(
        "usage",
        "usage",
        {"name": "site", "length": 64},
        check=lambda u: u.allocations == 8 and u.utilization > 0,
    ),
    Step(
        "available",
        "available",
        {"name": "site", "length": 64, "limit": 2},
        check=lambda found: (
            [str(p) for p in found] == ["2001:db8:0:106::/64", "2001:db8:0:107::/64"]
        ),
    ),
    Step(
        "release",
        "release",
        {"allocation_id": Ref("alloc-a", "id")},
        check=lambda a: a.state == "released",
    ),
    Step(
        "release-again",
        "release",
        {"allocation_id": Ref("alloc-a", "id")},
        check=lambda a: a.state == "released",
    ),
    Step("release-missing", "release", {"allocation_id": 987654321}, expect=Kind.NOT_FOUND),
    Step(
        "get-released",
        "get_allocation",
        {"allocation_id": Ref("alloc-a", "id")},
        check=lambda a: a.state == "released" and a.released_at is not None,
    ),
    Step(
        "get-allocation-missing",
        "get_allocation",
        {"allocation_id": 987654321},
        expect=Kind.NOT_FOUND,
    ),
    Step(
        "list-by-owner",
        "list_allocations",
        {"owner": "node/b"},
        check=lambda page: [str(a.prefix) for a in page.items] == ["2001:db8:0:8000::/64"],
    ),
    Step("list-bad-selector", "list_allocations", {"selector": "a=b=c"}, expect=Kind.INVALID),
    Step("delete-site-refused", "delete_pool", {"name": "site"}, expect=Kind.PRECONDITION),
    Step("delete-missing", "delete_pool", {"name": "missing"}, expect=Kind.NOT_FOUND),
    # -- the history of all of it, from the start
    Step(
        "watch",
        "watch",
        {"since_revision": 0, "pool": "site", "count": 3},
        grpc_only="a stream; REST reads the same history from /v1/history",
        check=lambda changes: (
            [c.kind for c in changes]
            == ["pool.created", "allocation.created", "allocation.created"]
        ),
    ),
    Step(
        "history-of-a-prefix",
        "history",
        {"prefix": "2001:db8:0:100::/56"},
        check=lambda page: (
            [(c.kind, c.owner) for c in page.items]
            == [
                ("pool.created", None),  # the site's own CIDR holds the prefix too
                ("allocation.created", "node/a"),
                ("allocation.created", "node/d"),
                ("allocation.created", "node/k"),
                ("allocation.created", "node/m1"),
                ("allocation.created", "node/m2"),
                ("allocation.created", "node/m3"),
                ("allocation.released", "node/a"),
            ]
        ),
    ),
    Step("history-bad-prefix", "history", {"prefix": "nonsense"}, expect=Kind.INVALID),
    Step(
        "watch-unknown-revision",
        "watch",
        {"since_revision": 10**12, "count": 1},
        expect=Kind.INVALID,
        grpc_only="a stream; REST reads the same history from /v1/history",
    ),
)
