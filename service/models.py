"""The service's values: what use cases take and return, shared by gRPC, REST and the CLI.

Plain frozen dataclasses, transport-free. Field names are the glossary of DESIGN.md ("Core
JSON shapes"); the adapters convert them to protobuf messages and JSON without renaming.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, Literal, TypeVar

from opentelemetry import trace

from engine import EngineError, Policy, Prefix, Strategy, parse_address, parse_prefix
from service.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from datetime import datetime

__all__ = [
    "CONTROL",
    "ROLES",
    "STATES",
    "SUBRESOURCES",
    "Allocation",
    "AllocationRequest",
    "Change",
    "Page",
    "Pool",
    "PoolPolicy",
    "PoolUsage",
    "RequestContext",
    "address_text",
    "check_labels",
    "check_owner",
    "check_pool_name",
    "make_request_id",
    "to_address",
    "to_prefix",
]

Role = Literal["container", "node", "pod", "service", "ingress", "egress"]
State = Literal["active", "quarantined", "released"]
ROLES: Final[tuple[Role, ...]] = ("container", "node", "pod", "service", "ingress", "egress")
STATES: Final[tuple[State, ...]] = ("active", "quarantined", "released")

# Same rules as the database's CHECK constraints, checked first so the error names the field.
_SEGMENT: Final = r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?"
_POOL_NAME: Final = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
# kind/name, e.g. node/worker-7, cluster/eu1-prod, app/payments/checkout.
_OWNER: Final = re.compile(r"[a-z][a-z0-9-]{0,62}/[^\s/\x00-\x1f\x7f][^\s\x00-\x1f\x7f]*")
# Control characters (C0 and DEL): PostgreSQL text cannot hold NUL, and none belongs in a key.
CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# Kubernetes label keys and values (an optional DNS-subdomain prefix and a name of at most 63).
_LABEL_KEY: Final = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_REQUEST_ID: Final = re.compile(r"[\x21-\x7e]{1,128}")
MAX_LABELS: Final = 64
# What REST paths put after a pool's name (/v1/pools/{name}/usage): never a name's last segment.
SUBRESOURCES: Final = ("allocations", "available", "usage")
DEFAULT_QUARANTINE_S: Final = 600


def check_pool_name(name: object, field_name: str = "name") -> str:
    """A pool name: path segments of ``a-z 0-9 . _ -`` joined by ``/``, at most 253 characters.

    The last segment may not be one of :data:`SUBRESOURCES`: REST paths put those after a
    pool's name (``/v1/pools/eu1-prod/pod/usage``), so such a name could not be addressed.
    """
    if not isinstance(name, str) or len(name) > 253 or not _POOL_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{field_name} {name!r} is not a pool name: use lower-case path segments such as "
            "'eu1' or 'eu1-prod/pod' (letters, digits, '.', '_', '-', joined by '/').",
            field=field_name,
        )
    if name.rsplit("/", 1)[-1] in SUBRESOURCES:
        raise InvalidRequestError(
            f"{field_name} {name!r} ends in {name.rsplit('/', 1)[-1]!r}, which names a "
            f"sub-resource in REST paths; a pool name may not end in "
            f"{', '.join(SUBRESOURCES)}.",
            field=field_name,
        )
    return name


def to_prefix(value: str | Prefix, field_name: str) -> Prefix:
    """A prefix from request text, strictly (:func:`engine.parse_prefix`).

    Raises:
        InvalidRequestError: not a usable prefix; the error names ``field_name``.
    """
    if isinstance(value, Prefix):
        return value
    try:
        return parse_prefix(value)
    except EngineError as exc:
        raise InvalidRequestError(exc.message, field=field_name) from exc


def to_address(value: str) -> Prefix:
    """An address from request text, as a host prefix (/32 or /128).

    Raises:
        InvalidRequestError: not an address (field ``address``).
    """
    try:
        return parse_address(value)
    except EngineError as exc:
        raise InvalidRequestError(exc.message, field="address") from exc


def address_text(host: Prefix) -> str:
    """The address of a host prefix (/32 or /128) as text, RFC 5952 for IPv6."""
    return str(host).rsplit("/", 1)[0]


def check_owner(owner: object) -> str:
    """An owner: ``kind/name`` such as ``node/worker-7``, at most 512 characters."""
    if not isinstance(owner, str) or len(owner) > 512 or not _OWNER.fullmatch(owner):
        raise InvalidRequestError(
            f"owner {owner!r} must be kind/name, e.g. node/worker-7 or cluster/eu1-prod "
            "(kind: lower-case letters, digits and '-'; no spaces).",
            field="owner",
        )
    return owner


def check_labels(labels: object, field_name: str = "labels") -> dict[str, str]:
    """Labels as Kubernetes writes them: at most 64, valid keys, values of 63 characters or less."""
    if not isinstance(labels, dict):
        raise InvalidRequestError(f"{field_name} must be a map of strings.", field=field_name)
    if len(labels) > MAX_LABELS:
        raise InvalidRequestError(
            f"{field_name} has {len(labels)} entries; at most {MAX_LABELS} are allowed.",
            field=field_name,
        )
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or len(key) > 317 or not _LABEL_KEY.fullmatch(key):
            raise InvalidRequestError(
                f"{field_name} key {key!r} is not a valid label key (Kubernetes rules).",
                field=field_name,
            )
        if not isinstance(value, str) or not _LABEL_VALUE.fullmatch(value):
            raise InvalidRequestError(
                f"{field_name}[{key!r}] = {value!r} is not a valid label value (at most 63 "
                "characters: letters, digits, '-', '_', '.', starting and ending alphanumeric).",
                field=field_name,
            )
        out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """A pool's rules: the engine's :class:`~engine.Policy` plus what the service enforces.

    Attributes:
        quarantine_seconds: How long a released prefix stays held before it may be handed
            out again (invariant 5). Default 600: long enough for routes, neighbour caches
            and firewall rules that still name the old holder to expire.
        allow_documentation: Let a root pool use documentation ranges (2001:db8::/32, ...),
            for tests and examples.
    """

    default_length: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    alignment_bits: int | None = None
    strategy: Strategy = Strategy.LOWEST
    reserved: tuple[Prefix, ...] = ()
    reserve_anycast: bool = False
    quarantine_seconds: int = DEFAULT_QUARANTINE_S
    allow_documentation: bool = False

    def engine_policy(self) -> Policy:
        """The part the engine applies."""
        return Policy(
            default_length=self.default_length,
            min_length=self.min_length,
            max_length=self.max_length,
            alignment_bits=self.alignment_bits,
            strategy=self.strategy,
            reserved=self.reserved,
            reserve_anycast=self.reserve_anycast,
        )

    def to_json(self) -> dict[str, object]:
        """As stored in ``pools.policy`` and shown by the APIs."""
        return {
            "default_length": self.default_length,
            "min_length": self.min_length,
            "max_length": self.max_length,
            "alignment_bits": self.alignment_bits,
            "strategy": self.strategy.value,
            "reserved": [str(r) for r in self.reserved],
            "reserve_anycast": self.reserve_anycast,
            "quarantine_seconds": self.quarantine_seconds,
            "allow_documentation": self.allow_documentation,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PoolPolicy:
        """Read a stored policy (trusted: it was validated when written)."""
        from engine import parse_prefix  # noqa: PLC0415 - keeps the import list of this module short

        def opt_int(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(str(value))

        reserved = data.get("reserved") or []
        if not isinstance(reserved, list):  # pragma: no cover - written by to_json
            raise TypeError("policy.reserved must be a list")
        return cls(
            default_length=opt_int("default_length"),
            min_length=opt_int("min_length"),
            max_length=opt_int("max_length"),
            alignment_bits=opt_int("alignment_bits"),
            strategy=Strategy(str(data.get("strategy", "lowest"))),
            reserved=tuple(parse_prefix(str(r)) for r in reserved),
            reserve_anycast=bool(data.get("reserve_anycast", False)),
            quarantine_seconds=int(str(data.get("quarantine_seconds", DEFAULT_QUARANTINE_S))),
            allow_documentation=bool(data.get("allow_documentation", False)),
        )


@dataclass(frozen=True, slots=True)
class Pool:
    """A named CIDR that hands out prefixes."""

    id: int
    name: str
    cidr: Prefix
    space: str
    role: Role
    parent: str | None
    policy: PoolPolicy
    labels: dict[str, str]
    generation: int
    revision: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Allocation:
    """A prefix held (or once held) by an owner."""

    id: int
    pool: str
    prefix: Prefix
    owner: str
    labels: dict[str, str]
    state: State
    created_at: datetime
    released_at: datetime | None
    reusable_at: datetime | None
    revision: int
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class AllocationRequest:
    """One prefix to allocate: by ``length`` (None: the pool's default) or an exact ``prefix``."""

    owner: str
    length: int | None = None
    prefix: Prefix | None = None
    labels: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class PoolUsage:
    """How full a pool is, with the free blocks of one length when asked."""

    pool: str
    cidr: Prefix
    total: int
    allocated: int
    reserved: int
    free: int
    allocations: int
    quarantined: int
    length: int | None
    free_blocks: int
    largest_free: Prefix | None
    fragmentation: float
    utilization: float


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the history, as the change feed delivers it.

    ``kind`` is one of ``pool.created``, ``pool.deleted``, ``allocation.created``,
    ``allocation.quarantined``, ``allocation.released``, ``cluster.planned``,
    ``cluster.deleted``; ``prefix`` is the pool's CIDR for pool changes (the IPv6 block for
    cluster changes, recorded on the block's pool); ``allocation_id`` and ``owner`` are None
    for them.
    """

    revision: int
    kind: str
    at: datetime
    pool: str
    allocation_id: int | None
    prefix: Prefix | None
    owner: str | None
    actor: str
    request_id: str | None
    trace_id: str | None


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list, with the cursor of the next page (None on the last one)."""

    items: Sequence[T]
    next_cursor: str | None


def make_request_id(given: str | None) -> str:
    """The caller's request id when it is 1-128 printable ASCII characters, else a new one."""
    if given is None or not _REQUEST_ID.fullmatch(given):
        return os.urandom(16).hex()
    return given


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asks, and the ids that tie the change to its request and trace (invariant 7)."""

    actor: str = "anonymous"
    request_id: str | None = None
    trace_id: str | None = None

    @classmethod
    def from_headers(
        cls, request_id: str | None, traceparent: str | None, *, actor: str = "anonymous"
    ) -> RequestContext:
        """From a call's ``x-request-id`` and W3C ``traceparent`` (HTTP header or gRPC metadata).

        The request id is kept when it is 1-128 printable ASCII characters, else one is made.
        The trace id is the current span's when tracing is on (the server span, which
        continues the caller's trace), else taken from a well-formed traceparent (never the
        all-zero id).
        """
        request_id = make_request_id(request_id)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            return cls(actor=actor, request_id=request_id, trace_id=f"{span.trace_id:032x}")
        trace_id = None
        match = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
        if match and match.group(1) != "0" * 32:
            trace_id = match.group(1)
        return cls(actor=actor, request_id=request_id, trace_id=trace_id)
