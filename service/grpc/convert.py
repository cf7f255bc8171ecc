"""Protobuf messages to and from the service's values: the one place that knows both.

The server reads requests with the ``*_args`` functions and writes answers with the
``*_pb`` ones; the client does the reverse with the ``*_from_pb`` ones. Field names are the
same on both sides (DESIGN.md's glossary); only enums, optional scalars and timestamps are
translated.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Final, cast

from engine import Strategy, parse_prefix
from service.clusters import Cluster, ClusterSettings, EgressIdentity, Template, resolve
from service.errors import InvalidRequestError
from service.grpc.gen import allocation_pb2 as apb
from service.grpc.gen import cluster_pb2 as cpb
from service.grpc.gen import pool_pb2 as ppb
from service.models import (
    DEFAULT_QUARANTINE_S,
    ROLES,
    Allocation,
    AllocationRequest,
    Change,
    Pool,
    PoolPolicy,
    PoolUsage,
    Role,
    State,
    to_prefix,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "allocation_from_pb",
    "allocation_pb",
    "allocation_request",
    "change_from_pb",
    "change_pb",
    "cluster_from_pb",
    "cluster_pb",
    "identity_from_pb",
    "identity_pb",
    "policy_from_pb",
    "policy_pb",
    "pool_from_pb",
    "pool_pb",
    "role_from_pb",
    "role_pb",
    "state_from_pb",
    "state_pb",
    "template_from_pb",
    "template_pb",
    "timestamp_from_pb",
    "usage_from_pb",
    "usage_pb",
]

_ROLE_PB: Final = {
    "container": ppb.POOL_ROLE_CONTAINER,
    "node": ppb.POOL_ROLE_NODE,
    "pod": ppb.POOL_ROLE_POD,
    "service": ppb.POOL_ROLE_SERVICE,
    "ingress": ppb.POOL_ROLE_INGRESS,
    "egress": ppb.POOL_ROLE_EGRESS,
}
_STRATEGY_PB: Final = {
    Strategy.LOWEST: ppb.STRATEGY_LOWEST,
    Strategy.BEST_FIT: ppb.STRATEGY_BEST_FIT,
}
_STATE_PB: Final = {
    "active": apb.ALLOCATION_STATE_ACTIVE,
    "quarantined": apb.ALLOCATION_STATE_QUARANTINED,
    "released": apb.ALLOCATION_STATE_RELEASED,
}
_CHANGE_PB: Final = {
    "pool.created": apb.CHANGE_KIND_POOL_CREATED,
    "pool.deleted": apb.CHANGE_KIND_POOL_DELETED,
    "allocation.created": apb.CHANGE_KIND_ALLOCATION_CREATED,
    "allocation.quarantined": apb.CHANGE_KIND_ALLOCATION_QUARANTINED,
    "allocation.released": apb.CHANGE_KIND_ALLOCATION_RELEASED,
    "cluster.planned": apb.CHANGE_KIND_CLUSTER_PLANNED,
    "cluster.deleted": apb.CHANGE_KIND_CLUSTER_DELETED,
}


def _invert(table: Mapping[str, int]) -> dict[int, str]:
    return {v: k for k, v in table.items()}


# -- enums ------------------------------------------------------------------------------------


def role_pb(role: str) -> ppb.PoolRole.ValueType:
    """A role as its enum value."""
    return _ROLE_PB[role]


def role_from_pb(value: int, *, field: str = "role") -> Role | None:
    """An enum value as a role; None for UNSPECIFIED.

    Raises:
        InvalidRequestError: a value this server does not know.
    """
    if value == ppb.POOL_ROLE_UNSPECIFIED:
        return None
    role = _invert(_ROLE_PB).get(value)
    if role is None:
        raise InvalidRequestError(
            f"{field} {value} is not a known role ({', '.join(ROLES)}).", field=field
        )
    return cast("Role", role)


def state_pb(state: str) -> apb.AllocationState.ValueType:
    """A state as its enum value."""
    return _STATE_PB[state]


def state_from_pb(value: int) -> State | None:
    """An enum value as a state; None for UNSPECIFIED.

    Raises:
        InvalidRequestError: a value this server does not know.
    """
    if value == apb.ALLOCATION_STATE_UNSPECIFIED:
        return None
    state = _invert(_STATE_PB).get(value)
    if state is None:
        raise InvalidRequestError(f"state {value} is not a known state.", field="state")
    return cast("State", state)


# -- scalars ----------------------------------------------------------------------------------


def timestamp_pb(value: dt.datetime | None, out: Timestamp) -> None:
    """Write ``value`` into a Timestamp field (left unset for None)."""
    if value is not None:
        out.FromDatetime(value)


def timestamp_from_pb(value: Timestamp, *, field: str = "timestamp") -> dt.datetime:
    """A Timestamp as an aware UTC datetime.

    Raises:
        InvalidRequestError: seconds beyond years 1-9999, or nanos beyond a second (a
            Timestamp's own rules); the error names ``field``.
    """
    try:
        return value.ToDatetime(dt.UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequestError(
            f"{field} (seconds {value.seconds}, nanos {value.nanos}) is not a valid Timestamp: "
            "seconds must lie within the years 1 to 9999 (-62135596800 to 253402300799) and "
            "nanos within 0 to 999999999.",
            field=field,
        ) from exc


def _opt_int(message: object, name: str) -> int | None:
    """An ``optional int32`` field: None when unset."""
    has = getattr(message, "HasField")  # noqa: B009 - one accessor for every message type
    return int(getattr(message, name)) if has(name) else None


def _text(value: str) -> str | None:
    """An empty string is proto3's 'unset'."""
    return value or None


def _big(value: int) -> str:
    return str(value)


# -- pools ------------------------------------------------------------------------------------


def policy_pb(policy: PoolPolicy) -> ppb.PoolPolicy:
    """A pool's policy as its message."""
    out = ppb.PoolPolicy(
        strategy=_STRATEGY_PB[policy.strategy],
        reserved=[str(r) for r in policy.reserved],
        reserve_anycast=policy.reserve_anycast,
        quarantine_seconds=policy.quarantine_seconds,
        allow_documentation=policy.allow_documentation,
    )
    for name in ("default_length", "min_length", "max_length", "alignment_bits"):
        value = getattr(policy, name)
        if value is not None:
            setattr(out, name, value)
    return out


def policy_from_pb(message: ppb.PoolPolicy) -> PoolPolicy:
    """A policy message as the service's policy; unset fields take their defaults.

    Raises:
        InvalidRequestError: a reserved range that is not a CIDR, an unknown strategy.
    """
    reserved = [to_prefix(text, "policy.reserved") for text in message.reserved]
    if message.strategy == ppb.STRATEGY_UNSPECIFIED:
        strategy = Strategy.LOWEST
    else:
        found = {v: k for k, v in _STRATEGY_PB.items()}.get(message.strategy)
        if found is None:
            raise InvalidRequestError(
                f"strategy {message.strategy} is not a known strategy.", field="policy.strategy"
            )
        strategy = found
    quarantine = _opt_int(message, "quarantine_seconds")
    return PoolPolicy(
        default_length=_opt_int(message, "default_length"),
        min_length=_opt_int(message, "min_length"),
        max_length=_opt_int(message, "max_length"),
        alignment_bits=_opt_int(message, "alignment_bits"),
        strategy=strategy,
        reserved=tuple(reserved),
        reserve_anycast=message.reserve_anycast,
        quarantine_seconds=DEFAULT_QUARANTINE_S if quarantine is None else quarantine,
        allow_documentation=message.allow_documentation,
    )


def pool_pb(pool: Pool) -> ppb.Pool:
    """A pool as its message."""
    out = ppb.Pool(
        name=pool.name,
        cidr=str(pool.cidr),
        space=pool.space,
        role=role_pb(pool.role),
        parent=pool.parent or "",
        policy=policy_pb(pool.policy),
        labels=pool.labels,
        generation=pool.generation,
        revision=pool.revision,
    )
    timestamp_pb(pool.created_at, out.created_at)
    return out


def pool_from_pb(message: ppb.Pool) -> Pool:
    """A pool message (from a server) as the service's value."""
    return Pool(
        id=0,  # not part of the contract: pools are named
        name=message.name,
        cidr=parse_prefix(message.cidr),
        space=message.space,
        role=role_from_pb(message.role) or "container",
        parent=_text(message.parent),
        policy=policy_from_pb(message.policy),
        labels=dict(message.labels),
        generation=message.generation,
        revision=message.revision,
        created_at=timestamp_from_pb(message.created_at),
    )


def usage_pb(usage: PoolUsage) -> ppb.PoolUsage:
    """A pool's usage as its message (address counts as decimal strings)."""
    out = ppb.PoolUsage(
        pool=usage.pool,
        cidr=str(usage.cidr),
        total=_big(usage.total),
        allocated=_big(usage.allocated),
        reserved=_big(usage.reserved),
        free=_big(usage.free),
        allocations=usage.allocations,
        quarantined=usage.quarantined,
        free_blocks=_big(usage.free_blocks),
        largest_free=str(usage.largest_free) if usage.largest_free else "",
        fragmentation=usage.fragmentation,
        utilization=usage.utilization,
    )
    if usage.length is not None:
        out.length = usage.length
    return out


def usage_from_pb(message: ppb.PoolUsage) -> PoolUsage:
    """A usage message as the service's value."""
    return PoolUsage(
        pool=message.pool,
        cidr=parse_prefix(message.cidr),
        total=int(message.total),
        allocated=int(message.allocated),
        reserved=int(message.reserved),
        free=int(message.free),
        allocations=message.allocations,
        quarantined=message.quarantined,
        length=_opt_int(message, "length"),
        free_blocks=int(message.free_blocks or 0),
        largest_free=parse_prefix(message.largest_free) if message.largest_free else None,
        fragmentation=message.fragmentation,
        utilization=message.utilization,
    )


# -- allocations ------------------------------------------------------------------------------


def allocation_pb(allocation: Allocation) -> apb.Allocation:
    """An allocation as its message."""
    out = apb.Allocation(
        id=allocation.id,
        pool=allocation.pool,
        prefix=str(allocation.prefix),
        owner=allocation.owner,
        labels=allocation.labels,
        state=state_pb(allocation.state),
        revision=allocation.revision,
        idempotency_key=allocation.idempotency_key or "",
    )
    timestamp_pb(allocation.created_at, out.created_at)
    timestamp_pb(allocation.released_at, out.released_at)
    timestamp_pb(allocation.reusable_at, out.reusable_at)
    return out


def allocation_from_pb(message: apb.Allocation) -> Allocation:
    """An allocation message (from a server) as the service's value."""
    return Allocation(
        id=message.id,
        pool=message.pool,
        prefix=parse_prefix(message.prefix),
        owner=message.owner,
        labels=dict(message.labels),
        state=state_from_pb(message.state) or "active",
        created_at=timestamp_from_pb(message.created_at),
        released_at=(
            timestamp_from_pb(message.released_at) if message.HasField("released_at") else None
        ),
        reusable_at=(
            timestamp_from_pb(message.reusable_at) if message.HasField("reusable_at") else None
        ),
        revision=message.revision,
        idempotency_key=_text(message.idempotency_key),
    )


def allocation_request(message: apb.PrefixRequest) -> AllocationRequest:
    """One prefix of a batch to allocate (validated by the use case).

    Raises:
        InvalidRequestError: a prefix that is not one.
    """
    target = message.WhichOneof("target")
    return AllocationRequest(
        owner=message.owner,
        length=message.prefix_length if target == "prefix_length" else None,
        prefix=to_prefix(message.prefix, "prefix") if target == "prefix" else None,
        labels=dict(message.labels),
        idempotency_key=_text(message.idempotency_key),
    )


def change_pb(change: Change) -> apb.Change:
    """A history entry as its message."""
    out = apb.Change(
        revision=change.revision,
        kind=_CHANGE_PB.get(change.kind, apb.CHANGE_KIND_UNSPECIFIED),
        pool=change.pool,
        allocation_id=change.allocation_id or 0,
        prefix=str(change.prefix) if change.prefix else "",
        owner=change.owner or "",
        actor=change.actor,
        request_id=change.request_id or "",
        trace_id=change.trace_id or "",
    )
    timestamp_pb(change.at, out.at)
    return out


def change_from_pb(message: apb.Change) -> Change:
    """A history message as the service's value (an unknown kind reads as ``unknown``)."""
    return Change(
        revision=message.revision,
        kind=_invert(_CHANGE_PB).get(message.kind, "unknown"),
        at=timestamp_from_pb(message.at),
        pool=message.pool,
        allocation_id=message.allocation_id or None,
        prefix=parse_prefix(message.prefix) if message.prefix else None,
        owner=_text(message.owner),
        actor=message.actor,
        request_id=_text(message.request_id),
        trace_id=_text(message.trace_id),
    )


def cluster_pb(cluster: Cluster) -> cpb.Cluster:
    """A cluster as its message."""
    dual = cluster.ipv4_block is not None
    out = cpb.Cluster(
        name=cluster.name,
        block=str(cluster.block.cidr),
        pools={role: pool_pb(p) for role, p in cluster.pools.items()},
        node_prefix_length=cluster.settings.node_prefix_length,
        template=cluster.template,
        settings=cluster.settings.to_text(),
        ipv4_block=str(cluster.ipv4_block.cidr) if cluster.ipv4_block else "",
        ipv4_pools={role: pool_pb(p) for role, p in cluster.ipv4_pools.items()},
        ipv4_node_prefix_length=cluster.settings.ipv4_node_prefix_length if dual else 0,
        parent_pool=cluster.parent,
        parent_pool_ipv4=cluster.ipv4_parent or "",
        revision=cluster.revision,
        block_pool=pool_pb(cluster.block),
    )
    if cluster.ipv4_block is not None:
        out.ipv4_block_pool.CopyFrom(pool_pb(cluster.ipv4_block))
    if isinstance(cluster.created_at, dt.datetime):
        timestamp_pb(cluster.created_at, out.created_at)
    return out


def cluster_from_pb(message: cpb.Cluster) -> Cluster:
    """A cluster message (from a server) as the service's value."""
    return Cluster(
        name=message.name,
        template=message.template,
        settings=_settings(message.settings),
        block=pool_from_pb(message.block_pool),
        pools={role: pool_from_pb(p) for role, p in message.pools.items()},
        parent=message.parent_pool,
        ipv4_block=pool_from_pb(message.ipv4_block_pool) if message.ipv4_block else None,
        ipv4_pools={role: pool_from_pb(p) for role, p in message.ipv4_pools.items()},
        ipv4_parent=_text(message.parent_pool_ipv4),
        revision=message.revision,
        created_at=(
            timestamp_from_pb(message.created_at) if message.HasField("created_at") else None
        ),
    )


def template_pb(template: Template) -> cpb.Template:
    """A template as its message."""
    return cpb.Template(
        name=template.name,
        description=template.description,
        settings=template.settings.to_text(),
        builtin=template.builtin,
    )


def template_from_pb(message: cpb.Template) -> Template:
    """A template message as the service's value."""
    return Template(
        name=message.name,
        description=message.description,
        settings=_settings(message.settings),
        builtin=message.builtin,
    )


def identity_pb(identity: EgressIdentity) -> cpb.EgressIdentity:
    """An application identity as its message."""
    return cpb.EgressIdentity(namespace=identity.namespace, labels=dict(identity.labels))


def identity_from_pb(message: cpb.EgressIdentity) -> EgressIdentity:
    """An application identity from its message (checked by the use case)."""
    return EgressIdentity(message.namespace, dict(message.labels))


def _settings(text: Mapping[str, str]) -> ClusterSettings:
    """Settings from a server; ones this client does not know (a newer server's) are skipped."""
    known = ClusterSettings.__dataclass_fields__
    return resolve(ClusterSettings(), {k: v for k, v in text.items() if k in known})
