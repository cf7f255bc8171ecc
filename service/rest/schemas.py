"""The REST API's bodies: msgspec structs with the glossary's field names and examples.

Converters from the service's values live beside each struct (``from_model``) and into
them (``to_policy``...); nothing else in the REST layer touches field names.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from engine import Strategy
from service.models import (
    DEFAULT_QUARANTINE_S,
    Allocation,
    AllocationRequest,
    Change,
    Pool,
    PoolPolicy,
    PoolUsage,
    to_prefix,
)

if TYPE_CHECKING:
    from service.auth import Token
    from service.clusters import Cluster, Template

__all__ = [
    "AllocateIn",
    "AllocationList",
    "AllocationOut",
    "ChangeList",
    "ChangeOut",
    "ClusterIn",
    "ClusterList",
    "ClusterOut",
    "EgressIn",
    "LookupOut",
    "PolicyIn",
    "PolicyOut",
    "PoolIn",
    "PoolList",
    "PoolOut",
    "PrefixList",
    "PrefixRequestIn",
    "Problem",
    "RuleViolation",
    "TemplateIn",
    "TemplateList",
    "TemplateOut",
    "TokenCreatedOut",
    "TokenIn",
    "TokenList",
    "TokenOut",
    "UsageOut",
]

RoleName = Literal["container", "node", "pod", "service", "ingress", "egress"]
StateName = Literal["active", "quarantined", "released"]
StrategyName = Literal["lowest", "best_fit"]
Length = Annotated[int, msgspec.Meta(ge=0, le=128, description="A prefix length.")]
Labels = Annotated[
    dict[str, str],
    msgspec.Meta(description="Labels as Kubernetes writes them (at most 64).", examples=[{}]),
]


class PolicyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A pool's rules; every field is optional."""

    default_length: Length | None = None
    min_length: Length | None = None
    max_length: Length | None = None
    alignment_bits: Annotated[int, msgspec.Meta(ge=0, le=128)] | None = None
    strategy: StrategyName = "lowest"
    reserved: list[str] = msgspec.field(default_factory=list)
    reserve_anycast: bool = False
    quarantine_seconds: Annotated[int, msgspec.Meta(ge=0, le=10 * 365 * 86400)] = (
        DEFAULT_QUARANTINE_S
    )
    allow_documentation: bool = False

    def to_policy(self) -> PoolPolicy:
        """As the service's policy (reserved ranges are parsed by the use case's checks)."""
        return PoolPolicy(
            default_length=self.default_length,
            min_length=self.min_length,
            max_length=self.max_length,
            alignment_bits=self.alignment_bits,
            strategy=Strategy(self.strategy),
            reserved=tuple(to_prefix(r, "policy.reserved") for r in self.reserved),
            reserve_anycast=self.reserve_anycast,
            quarantine_seconds=self.quarantine_seconds,
            allow_documentation=self.allow_documentation,
        )


class PolicyOut(msgspec.Struct, kw_only=True):
    """A pool's rules."""

    default_length: int | None
    min_length: int | None
    max_length: int | None
    alignment_bits: int | None
    strategy: StrategyName
    reserved: list[str]
    reserve_anycast: bool
    quarantine_seconds: int
    allow_documentation: bool

    @classmethod
    def from_model(cls, policy: PoolPolicy) -> PolicyOut:
        """From the service's policy."""
        return cls(
            default_length=policy.default_length,
            min_length=policy.min_length,
            max_length=policy.max_length,
            alignment_bits=policy.alignment_bits,
            strategy=policy.strategy.value,
            reserved=[str(r) for r in policy.reserved],
            reserve_anycast=policy.reserve_anycast,
            quarantine_seconds=policy.quarantine_seconds,
            allow_documentation=policy.allow_documentation,
        )


class PoolIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A pool to create.

    A root pool has a ``cidr``; a child pool has a ``parent`` and a ``prefix_length`` (the
    parent chooses where) or an exact ``cidr``.
    """

    name: Annotated[str, msgspec.Meta(examples=["eu1-prod/pod"], max_length=253)]
    cidr: Annotated[str, msgspec.Meta(examples=["fd3c:9e12:7a40::/48"])] | None = None
    parent: str | None = None
    prefix_length: Length | None = None
    role: RoleName = "container"
    space: str = "default"
    policy: PolicyIn | None = None
    labels: Labels = msgspec.field(default_factory=dict)


class PoolOut(msgspec.Struct, kw_only=True):
    """A named CIDR that hands out prefixes."""

    name: str
    cidr: str
    space: str
    role: RoleName
    parent: str | None
    policy: PolicyOut
    labels: dict[str, str]
    generation: int
    revision: int
    created_at: dt.datetime

    @classmethod
    def from_model(cls, pool: Pool) -> PoolOut:
        """From the service's pool."""
        return cls(
            name=pool.name,
            cidr=str(pool.cidr),
            space=pool.space,
            role=pool.role,
            parent=pool.parent,
            policy=PolicyOut.from_model(pool.policy),
            labels=pool.labels,
            generation=pool.generation,
            revision=pool.revision,
            created_at=pool.created_at,
        )


class PrefixRequestIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One prefix to allocate.

    ``prefix_length`` or an exact ``prefix``; neither means the pool's default length.
    """

    owner: Annotated[str, msgspec.Meta(examples=["node/worker-7"], max_length=512)]
    prefix_length: Length | None = None
    prefix: str | None = None
    labels: Labels = msgspec.field(default_factory=dict)
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None

    def to_request(self) -> AllocationRequest:
        """As the service's request (validated again by the use case)."""
        return AllocationRequest(
            owner=self.owner,
            length=self.prefix_length,
            prefix=to_prefix(self.prefix, "prefix") if self.prefix is not None else None,
            labels=self.labels,
            idempotency_key=self.idempotency_key,
        )


class AllocateIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What to allocate: one prefix, or a batch.

    One: ``owner`` and ``prefix_length`` or ``prefix`` (the ``Idempotency-Key`` header keys
    it). A batch: ``requests``, allocated all or nothing.
    """

    owner: Annotated[str, msgspec.Meta(examples=["node/worker-7"], max_length=512)] | None = None
    prefix_length: Length | None = None
    prefix: str | None = None
    labels: Labels = msgspec.field(default_factory=dict)
    requests: list[PrefixRequestIn] | None = None
    dry_run: bool = False


class AllocationOut(msgspec.Struct, kw_only=True):
    """A prefix held by an owner (or held once: released rows are the history)."""

    id: int
    pool: str
    prefix: str
    owner: str
    labels: dict[str, str]
    state: StateName
    created_at: dt.datetime
    released_at: dt.datetime | None
    reusable_at: dt.datetime | None
    revision: int
    idempotency_key: str | None

    @classmethod
    def from_model(cls, allocation: Allocation) -> AllocationOut:
        """From the service's allocation."""
        return cls(
            id=allocation.id,
            pool=allocation.pool,
            prefix=str(allocation.prefix),
            owner=allocation.owner,
            labels=allocation.labels,
            state=allocation.state,
            created_at=allocation.created_at,
            released_at=allocation.released_at,
            reusable_at=allocation.reusable_at,
            revision=allocation.revision,
            idempotency_key=allocation.idempotency_key,
        )


class BatchOut(msgspec.Struct, kw_only=True):
    """A batch's allocations, in the order asked."""

    items: list[AllocationOut]


class UsageOut(msgspec.Struct, kw_only=True):
    """How full a pool is.

    Address counts are decimal strings (an IPv6 pool holds up to 2^128); the percentages
    are for people.
    """

    pool: str
    cidr: str
    total: str
    allocated: str
    reserved: str
    free: str
    allocations: int
    quarantined: int
    length: int | None
    free_blocks: str
    largest_free: str | None
    fragmentation: float
    utilization: float
    utilization_percent: float
    free_percent: float

    @classmethod
    def from_model(cls, usage: PoolUsage) -> UsageOut:
        """From the service's usage."""
        return cls(
            pool=usage.pool,
            cidr=str(usage.cidr),
            total=str(usage.total),
            allocated=str(usage.allocated),
            reserved=str(usage.reserved),
            free=str(usage.free),
            allocations=usage.allocations,
            quarantined=usage.quarantined,
            length=usage.length,
            free_blocks=str(usage.free_blocks),
            largest_free=str(usage.largest_free) if usage.largest_free else None,
            fragmentation=usage.fragmentation,
            utilization=usage.utilization,
            utilization_percent=round(usage.utilization * 100, 4),
            free_percent=round(usage.free / usage.total * 100, 4) if usage.total else 0.0,
        )


class ChangeOut(msgspec.Struct, kw_only=True):
    """One entry of the history."""

    revision: int
    kind: str
    at: dt.datetime
    pool: str
    allocation_id: int | None
    prefix: str | None
    owner: str | None
    actor: str
    request_id: str | None
    trace_id: str | None

    @classmethod
    def from_model(cls, change: Change) -> ChangeOut:
        """From the service's change."""
        return cls(
            revision=change.revision,
            kind=change.kind,
            at=change.at,
            pool=change.pool,
            allocation_id=change.allocation_id,
            prefix=str(change.prefix) if change.prefix else None,
            owner=change.owner,
            actor=change.actor,
            request_id=change.request_id,
            trace_id=change.trace_id,
        )


class PoolList(msgspec.Struct, kw_only=True):
    """One page of pools; ``next`` is the URL of the next page (null on the last)."""

    items: list[PoolOut]
    next: str | None


class AllocationList(msgspec.Struct, kw_only=True):
    """One page of allocations; ``next`` is the URL of the next page (null on the last)."""

    items: list[AllocationOut]
    next: str | None


class ChangeList(msgspec.Struct, kw_only=True):
    """One page of the history; ``next`` is the URL of the next page (null on the last)."""

    items: list[ChangeOut]
    next: str | None


class PrefixList(msgspec.Struct, kw_only=True):
    """Free prefixes, in address order."""

    items: list[str]


class LookupOut(msgspec.Struct, kw_only=True):
    """Who holds (or held, at ``at``) an address: innermost first, each with its pool."""

    address: str
    at: dt.datetime | None
    allocations: list[AllocationOut]


class RuleViolation(msgspec.Struct, kw_only=True):
    """One broken Kubernetes/Cilium rule of a cluster plan."""

    rule: Annotated[str, msgspec.Meta(examples=["node-mask-diff"])]
    message: str
    reference: str


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    kind: str | None = None
    field: str | None = None
    conflicts: list[str] | None = None
    pool: str | None = None
    length: int | None = None
    largest_free: str | None = None
    violations: list[RuleViolation] | None = None
    request_id: str | None = None


# -- clusters --------------------------------------------------------------------------------


class ClusterIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A cluster to plan.

    Its block comes from ``parent_pool`` (and ``parent_pool_ipv4`` for dual-stack), laid out
    by ``template`` with ``overrides``.
    """

    name: Annotated[str, msgspec.Meta(examples=["eu1-prod"], max_length=63)]
    parent_pool: Annotated[str, msgspec.Meta(examples=["eu1"])]
    parent_pool_ipv4: str | None = None
    template: Annotated[str, msgspec.Meta(examples=["ipv6"])] | None = None
    overrides: Annotated[
        dict[str, str],
        msgspec.Meta(
            description="Template settings by name, as text.",
            examples=[{"node_prefix_length": "64", "service_prefix_length": "112"}],
        ),
    ] = msgspec.field(default_factory=dict)
    dry_run: bool = False


class ClusterOut(msgspec.Struct, kw_only=True):
    """A cluster: its blocks, role pools and the settings it was planned with."""

    name: str
    block: str
    pools: dict[str, PoolOut]
    node_prefix_length: int
    template: str
    settings: dict[str, str | int | bool]
    parent_pool: str
    ipv4_block: str | None
    ipv4_pools: dict[str, PoolOut]
    ipv4_node_prefix_length: int | None
    parent_pool_ipv4: str | None
    revision: int
    created_at: dt.datetime | None

    @classmethod
    def from_model(cls, cluster: Cluster) -> ClusterOut:
        """From the service's cluster."""
        dual = cluster.ipv4_block is not None
        return cls(
            name=cluster.name,
            block=str(cluster.block.cidr),
            pools={role: PoolOut.from_model(p) for role, p in cluster.pools.items()},
            node_prefix_length=cluster.settings.node_prefix_length,
            template=cluster.template,
            settings=cluster.settings.to_json(),  # type: ignore[arg-type]
            parent_pool=cluster.parent,
            ipv4_block=str(cluster.ipv4_block.cidr) if cluster.ipv4_block else None,
            ipv4_pools={role: PoolOut.from_model(p) for role, p in cluster.ipv4_pools.items()},
            ipv4_node_prefix_length=cluster.settings.ipv4_node_prefix_length if dual else None,
            parent_pool_ipv4=cluster.ipv4_parent,
            revision=cluster.revision,
            created_at=cluster.created_at if isinstance(cluster.created_at, dt.datetime) else None,
        )


class ClusterList(msgspec.Struct, kw_only=True):
    """One page of clusters; ``next`` is the URL of the next page (null on the last)."""

    items: list[ClusterOut]
    next: str | None


class TemplateIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A template to store: ``base``'s settings (default ``ipv6``) with ``overrides``."""

    name: Annotated[str, msgspec.Meta(examples=["small"], max_length=63)]
    base: str | None = None
    overrides: dict[str, str] = msgspec.field(default_factory=dict)
    description: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class TemplateOut(msgspec.Struct, kw_only=True):
    """A named set of cluster settings."""

    name: str
    description: str
    settings: dict[str, str | int | bool]
    builtin: bool

    @classmethod
    def from_model(cls, template: Template) -> TemplateOut:
        """From the service's template."""
        return cls(
            name=template.name,
            description=template.description,
            settings=template.settings.to_json(),  # type: ignore[arg-type]
            builtin=template.builtin,
        )


class TemplateList(msgspec.Struct, kw_only=True):
    """Every template: built-in ones first."""

    items: list[TemplateOut]


class EgressIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An application identity (namespace and pod labels) asking for an egress address."""

    namespace: Annotated[str, msgspec.Meta(examples=["tenant-a"])]
    labels: Annotated[dict[str, str], msgspec.Meta(examples=[{"app": "billing"}])]
    ipv4: bool = False


class TokenIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A token to create: its name (the actor in the history), scope, pools and lifetime."""

    name: Annotated[str, msgspec.Meta(examples=["eu1-prod-controller"], max_length=128)]
    scope: Literal["read", "allocate", "admin"]
    pools: Annotated[list[str], msgspec.Meta(examples=[["eu1-prod/*"]], max_length=16)] = (
        msgspec.field(default_factory=list)
    )
    expires: Annotated[str, msgspec.Meta(examples=["90d"], max_length=32)] | None = None


class TokenOut(msgspec.Struct, kw_only=True):
    """A token as listed (its secret is shown once, when it is created)."""

    name: str
    scope: str
    pools: list[str]
    state: Literal["active", "expired", "revoked"]
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @classmethod
    def from_model(cls, token: Token) -> TokenOut:
        """From the service's token."""
        return cls(
            name=token.name,
            scope=token.scope.value,
            pools=list(token.pools),
            state=token.state,  # type: ignore[arg-type]
            created_by=token.created_by,
            created_at=token.created_at,
            expires_at=token.expires_at,
            revoked_at=token.revoked_at,
            last_used_at=token.last_used_at,
        )


class TokenCreatedOut(TokenOut, kw_only=True):
    """A new token with its secret: shown this once, never stored."""

    token: str

    @classmethod
    def created(cls, token: Token, secret: str) -> TokenCreatedOut:
        """From the service's new token and its secret text."""
        return cls(token=secret, **msgspec.structs.asdict(TokenOut.from_model(token)))


class TokenList(msgspec.Struct, kw_only=True):
    """Tokens by name."""

    items: list[TokenOut]
