"""Cluster plans, without I/O: templates, their settings, the layout of a cluster block.

A cluster is one block per family carved from a site pool, and five role pools carved from
the block: ``node`` (node addresses), ``pod`` (sliced into one prefix per node), ``service``,
``ingress`` (load-balancer VIPs) and ``egress`` (egress-gateway addresses). The IPv6 pools
are named ``<cluster>`` (the block) and ``<cluster>/<role>``; a dual-stack cluster adds
``<cluster>/ipv4`` and ``<cluster>/ipv4/<role>`` from an IPv4 site pool.

A template is a complete :class:`ClusterSettings`; the built-in ones are below, users store
their own (the service keeps them in ``cluster_templates``). A plan resolves the template and
its overrides to settings, lays the roles out inside a candidate block with the engine
(:func:`layout`), and checks the result with :func:`engine.cluster.check_cluster` before
anything is written (:func:`check`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

from engine import EngineError, PoolAllocator, Prefix
from engine.cluster import CLUSTER_SUBNET_MAX_DIFF, ClusterPlan, check_cluster
from service.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from engine.errors import Violation
    from service.models import Allocation, Pool

__all__ = [
    "BUILTIN_TEMPLATES",
    "CLUSTER_ROLES",
    "DEFAULT_TEMPLATE",
    "Cluster",
    "ClusterSettings",
    "EgressIdentity",
    "Template",
    "check",
    "check_cluster_name",
    "check_settings",
    "layout",
    "node_key",
    "resolve",
]

Family = Literal["ipv6", "dual-stack"]
RoutingMode = Literal["native", "tunnel"]
IpamMode = Literal["kubernetes", "cluster-pool"]
NodeIpam = Literal["kipam", "kube-controller-manager"]

CLUSTER_ROLES: Final = ("node", "pod", "service", "ingress", "egress")
# The order roles are carved from the block: largest first packs them without holes.
_CARVE_ORDER: Final = ("pod", "node", "service", "ingress", "egress")
DEFAULT_TEMPLATE: Final = "ipv6"
# A cluster's name is the first segment of its pools' names and the name of Kubernetes
# objects rendered for it: a DNS-1123 label.
_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TEMPLATE_NAME: Final = _NAME


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """Everything a cluster plan decides by, as a template or a cluster stores it.

    Lengths are prefix lengths. ``node_prefix_length`` is the per-node slice of the pod
    prefix (kube-controller-manager ``--node-cidr-mask-size-ipv6``, Cilium
    ``clusterPoolIPv6MaskSize``); ``node_cidr_prefix_length`` is the node role's own pool
    (the nodes' addresses). The ``ipv4_`` lengths are used by dual-stack clusters only.

    Attributes:
        family: ``ipv6`` (IPv6-only) or ``dual-stack`` (IPv6 primary, plus IPv4).
        routing_mode: Cilium ``routingMode``: ``native`` or ``tunnel``.
        ipam_mode: Cilium ``ipam.mode``: ``kubernetes`` (Cilium reads ``Node.spec.podCIDRs``)
            or ``cluster-pool`` (the Cilium operator slices the pod prefix).
        node_ipam: With ``ipam_mode: kubernetes``, who writes ``Node.spec.podCIDRs``:
            ``kipam`` (``kipam node allocate`` or a controller over gRPC;
            kube-controller-manager runs with ``--allocate-node-cidrs=false``) or
            ``kube-controller-manager``. kube-controller-manager's and the Cilium operator's
            slicers allow at most 16 bits between the pod prefix and the node mask; kipam
            does not need that limit.
        legacy_service_allocator: Whether the service range must fit the legacy bitmap
            allocator (at most 20 host bits): true unless every apiserver is 1.34 or later
            and kubeadm does not validate the range.
        auto_direct_node_routes: Cilium ``autoDirectNodeRoutes`` in native routing (nodes
            share an L2 segment); false means routes come from BGP or the fabric.
        ipv6_masquerade: Cilium ``enableIPv6Masquerade``; false when pod prefixes are
            routable (global or routed ULA).
        ipv4_masquerade: Cilium ``enableIPv4Masquerade`` for dual-stack clusters.
        dns_domain: kubeadm ``networking.dnsDomain``.
        node_quarantine_seconds: How long a released node prefix is held back.
        ingress_quarantine_seconds: How long a released VIP is held back.
        egress_quarantine_seconds: How long a released egress address is held back, during
            which the same identity gets it back.
        egress_gateway_labels: The node selector of rendered egress gateway policies, as
            ``key=value[,key=value]``.
        egress_gateway: Cilium ``egressGateway.enabled`` (with ``bpf.masquerade``). Off in
            the IPv6-only templates: released Cilium versions run the egress gateway only with
            IPv4 masquerading, and IPv6 egress addresses came later (cilium/cilium#44524);
            turn it on where your Cilium has it. The egress pool hands out addresses either
            way.
        kube_proxy_replacement: Cilium ``kubeProxyReplacement`` (the egress gateway needs
            it), with ``k8sServiceHost: auto`` so the agent finds the apiserver without
            kube-proxy (kubeadm's ``cluster-info`` ConfigMap).
    """

    family: Family = "ipv6"
    block_prefix_length: int = 48
    node_cidr_prefix_length: int = 64
    pod_prefix_length: int = 52
    node_prefix_length: int = 64
    service_prefix_length: int = 112
    ingress_prefix_length: int = 112
    egress_prefix_length: int = 120
    ipv4_block_prefix_length: int = 16
    ipv4_node_cidr_prefix_length: int = 22
    ipv4_pod_prefix_length: int = 17
    ipv4_node_prefix_length: int = 24
    ipv4_service_prefix_length: int = 20
    ipv4_ingress_prefix_length: int = 24
    ipv4_egress_prefix_length: int = 26
    routing_mode: RoutingMode = "native"
    ipam_mode: IpamMode = "kubernetes"
    node_ipam: NodeIpam = "kipam"
    legacy_service_allocator: bool = True
    auto_direct_node_routes: bool = True
    ipv6_masquerade: bool = False
    ipv4_masquerade: bool = True
    dns_domain: str = "cluster.local"
    node_quarantine_seconds: int = 3600
    ingress_quarantine_seconds: int = 3600
    egress_quarantine_seconds: int = 86400
    egress_gateway_labels: str = "kipam.io/egress-gateway=true"
    egress_gateway: bool = False
    kube_proxy_replacement: bool = True

    @property
    def dual_stack(self) -> bool:
        """Whether the cluster has IPv4 pools too."""
        return self.family == "dual-stack"

    @property
    def max_node_mask_diff(self) -> int | None:
        """The node mask rule: 16 bits when kube-controller-manager or Cilium slices."""
        if self.ipam_mode == "kubernetes" and self.node_ipam == "kipam":
            return None
        return CLUSTER_SUBNET_MAX_DIFF

    @property
    def allocate_node_cidrs(self) -> bool:
        """kube-controller-manager ``--allocate-node-cidrs``."""
        return self.ipam_mode == "kubernetes" and self.node_ipam == "kube-controller-manager"

    def lengths(self, version: int) -> dict[str, int]:
        """The block's and each role's prefix length for one family (4 or 6)."""
        p = "ipv4_" if version == 4 else ""
        return {
            "block": getattr(self, f"{p}block_prefix_length"),
            "node": getattr(self, f"{p}node_cidr_prefix_length"),
            "pod": getattr(self, f"{p}pod_prefix_length"),
            "service": getattr(self, f"{p}service_prefix_length"),
            "ingress": getattr(self, f"{p}ingress_prefix_length"),
            "egress": getattr(self, f"{p}egress_prefix_length"),
        }

    def node_length(self, version: int) -> int:
        """The per-node pod prefix length for one family."""
        return self.ipv4_node_prefix_length if version == 4 else self.node_prefix_length

    def gateway_labels(self) -> dict[str, str]:
        """``egress_gateway_labels`` as a map."""
        return dict(
            part.split("=", 1) for part in self.egress_gateway_labels.split(",") if "=" in part
        )

    def to_json(self) -> dict[str, object]:
        """As stored and shown: every setting by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_text(self) -> dict[str, str]:
        """Every setting as text, as overrides take them (``resolve`` reads them back)."""
        return {
            k: (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in self.to_json().items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ClusterSettings:
        """Read stored settings (trusted); settings added since take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]


_FIELDS: Final = {f.name: f for f in dataclasses.fields(ClusterSettings)}
_CHOICES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "family": ("ipv6", "dual-stack"),
        "routing_mode": ("native", "tunnel"),
        "ipam_mode": ("kubernetes", "cluster-pool"),
        "node_ipam": ("kipam", "kube-controller-manager"),
    }
)
_TRUE: Final = ("true", "yes", "on", "1")
_FALSE: Final = ("false", "no", "off", "0")
_DNS_DOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_KEY: Final = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def _parse(name: str, text: str) -> object:  # noqa: C901, PLR0912 - one branch per kind of setting
    """One setting from its text form (overrides arrive as strings)."""
    kind = _FIELDS[name].type
    where = f"overrides.{name}"
    if name in _CHOICES:
        if text not in _CHOICES[name]:
            raise InvalidRequestError(
                f"{name} must be one of {', '.join(_CHOICES[name])}, not {text!r}.", field=where
            )
        return text
    if kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise InvalidRequestError(f"{name} must be true or false, not {text!r}.", field=where)
    if kind == "int":
        try:
            value = int(text.removeprefix("/"))
        except ValueError:
            raise InvalidRequestError(
                f"{name} must be a whole number, not {text!r}.", field=where
            ) from None
        bits = 32 if name.startswith("ipv4_") else 128
        if name.endswith("_prefix_length") and not 0 <= value <= bits:
            raise InvalidRequestError(
                f"{name} must be a prefix length from 0 to {bits}, not {value}.", field=where
            )
        if name.endswith("_seconds") and not 0 <= value <= 10 * 365 * 86400:
            raise InvalidRequestError(
                f"{name} must be from 0 to ten years in seconds, not {value}.", field=where
            )
        return value
    if name == "dns_domain":
        if len(text) > 253 or not _DNS_DOMAIN.fullmatch(text):
            raise InvalidRequestError(
                f"dns_domain {text!r} is not a DNS-1123 subdomain.", field=where
            )
        return text
    if name == "egress_gateway_labels":
        for part in text.split(","):
            key, sep, label = part.partition("=")
            if not sep or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(label):
                raise InvalidRequestError(
                    f"egress_gateway_labels must be key=value[,key=value] with Kubernetes label "
                    f"keys and values, not {text!r}.",
                    field=where,
                )
        return text
    raise AssertionError(name)  # pragma: no cover - every field is handled above


def check_settings(settings: ClusterSettings) -> None:
    """Settings that contradict each other, refused with the one to change.

    Raises:
        InvalidRequestError: the egress gateway without kube-proxy replacement, or (dual-stack)
            without IPv4 masquerading: the Cilium agent refuses to start with either.
    """
    if settings.egress_gateway and not settings.kube_proxy_replacement:
        raise InvalidRequestError(
            "egress_gateway needs kube_proxy_replacement (Cilium's egress gateway runs only "
            "with kube-proxy replacement): set kube_proxy_replacement=true or "
            "egress_gateway=false.",
            field="overrides.kube_proxy_replacement",
        )
    if settings.egress_gateway and settings.dual_stack and not settings.ipv4_masquerade:
        raise InvalidRequestError(
            "egress_gateway needs ipv4_masquerade on a dual-stack cluster (the Cilium agent "
            "refuses to start the egress gateway without IPv4 masquerading): set "
            "ipv4_masquerade=true or egress_gateway=false.",
            field="overrides.ipv4_masquerade",
        )


def resolve(base: ClusterSettings, overrides: Mapping[str, str]) -> ClusterSettings:
    """A template's settings with overrides applied, each checked.

    Raises:
        InvalidRequestError: an unknown name (the message lists the known ones) or a bad value.
    """
    changes: dict[str, object] = {}
    for name, text in sorted(overrides.items()):
        if name not in _FIELDS:
            raise InvalidRequestError(
                f"{name!r} is not a cluster setting; the settings are: {', '.join(_FIELDS)}.",
                field=f"overrides.{name}",
            )
        if not isinstance(text, str):
            raise InvalidRequestError(f"{name} must be given as text.", field=f"overrides.{name}")
        changes[name] = _parse(name, text.strip())
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    """A named set of cluster settings: built in, or stored by a user."""

    name: str
    description: str
    settings: ClusterSettings
    builtin: bool = False


BUILTIN_TEMPLATES: Final[Mapping[str, Template]] = MappingProxyType(
    {
        t.name: t
        for t in (
            Template(
                name="ipv6",
                description=(
                    "IPv6-only, native routing, Cilium ipam.mode=kubernetes with kipam writing "
                    "Node.spec.podCIDRs: /48 block, /64 nodes, /52 pods sliced into /64 per "
                    "node, /112 services and ingress VIPs, /120 egress."
                ),
                settings=ClusterSettings(),
                builtin=True,
            ),
            Template(
                name="ipv6-dense",
                description=(
                    "Like ipv6, with a /56 pod prefix sliced into /80 per node (kipam node "
                    "IPAM only: the 24 bits between them exceed the slicers' 16)."
                ),
                settings=ClusterSettings(pod_prefix_length=56, node_prefix_length=80),
                builtin=True,
            ),
            Template(
                name="ipv6-cluster-pool",
                description=(
                    "IPv6-only, native routing, Cilium ipam.mode=cluster-pool: the Cilium "
                    "operator slices the /52 pod prefix into /64 per node."
                ),
                settings=ClusterSettings(ipam_mode="cluster-pool"),
                builtin=True,
            ),
            Template(
                name="dual-stack",
                description=(
                    "IPv6 primary plus IPv4 from a second site pool: a /16 IPv4 block with a "
                    "/17 pod prefix sliced into /24 per node, a /20 service range; Cilium's "
                    "egress gateway on."
                ),
                settings=ClusterSettings(family="dual-stack", egress_gateway=True),
                builtin=True,
            ),
        )
    }
)


def check_cluster_name(name: object, what: str = "name") -> str:
    """A cluster (or template) name: a DNS-1123 label, as Kubernetes object names go."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{what} {name!r} is not a valid name: at most 63 lower-case letters, digits and "
            "'-', starting and ending with a letter or digit.",
            field=what,
        )
    return name


# -- layout and checks --------------------------------------------------------------------------


def layout(block: Prefix, settings: ClusterSettings) -> dict[str, Prefix]:
    """Where each role goes inside ``block``: decided by the engine, largest role first.

    Deterministic: the same block and settings give the same layout.

    Raises:
        InvalidRequestError: a role is longer than a prefix can be or shorter than the
            block, or the roles do not fit in the block together (the message says by how
            much).
    """
    lengths = settings.lengths(block.version)
    engine = PoolAllocator(block)
    out: dict[str, Prefix] = {}
    prefix = "ipv4_" if block.version == 4 else ""
    for role in sorted(_CARVE_ORDER, key=lambda r: (lengths[r], _CARVE_ORDER.index(r))):
        length = lengths[role]
        setting = f"{prefix}{'node_cidr' if role == 'node' else role}_prefix_length"
        if length < block.length:
            raise InvalidRequestError(
                f"{setting} /{length} is shorter than the cluster block {block}: a role must "
                f"fit inside the block; use /{block.length + 1} or longer, or a shorter "
                f"{prefix}block_prefix_length.",
                field=f"overrides.{setting}",
            )
        try:
            out[role] = engine.allocate(length)
        except EngineError as exc:  # it says why; we say what to change
            needed = sum(1 << (block.bits - lengths[r]) for r in CLUSTER_ROLES)
            family = "IPv4" if block.version == 4 else "IPv6"
            raise InvalidRequestError(
                f"The roles do not fit in a /{block.length} {family} "
                f"block: they need {needed:,} addresses, the block holds {block.size:,} "
                f"({exc}). Use a shorter {prefix}block_prefix_length or longer role lengths.",
                field=f"overrides.{prefix}block_prefix_length",
            ) from None
    return {role: out[role] for role in CLUSTER_ROLES}


def check(
    blocks: Sequence[Prefix],
    roles: Mapping[str, Sequence[Prefix]],
    settings: ClusterSettings,
    *,
    allow_documentation: bool = False,
) -> list[Violation]:
    """Every Kubernetes and Cilium rule of :mod:`engine.cluster` over a laid-out plan."""
    node_lengths = {b.version: settings.node_length(b.version) for b in blocks}
    return check_cluster(
        ClusterPlan(
            blocks=blocks,
            roles=roles,
            node_lengths=node_lengths,
            allow_documentation=allow_documentation,
            legacy_allocator=settings.legacy_service_allocator,
            max_node_mask_diff=settings.max_node_mask_diff,
        )
    )


# -- the cluster and its holders ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A planned cluster: its blocks, role pools and the settings it was planned with.

    Attributes:
        name: The cluster's name.
        template: The template it was planned from.
        settings: The settings it was planned with (template plus overrides).
        pools: Role to its IPv6 pool.
        ipv4_pools: Role to its IPv4 pool; empty for IPv6-only clusters.
        block: The IPv6 block's pool.
        ipv4_block: The IPv4 block's pool, or None.
        parent: The IPv6 site pool's name.
        ipv4_parent: The IPv4 site pool's name, or None.
        revision: The revision of the plan.
        created_at: When it was planned (None in a dry run).
    """

    name: str
    template: str
    settings: ClusterSettings
    block: Pool
    pools: Mapping[str, Pool]
    parent: str
    ipv4_block: Pool | None = None
    ipv4_pools: Mapping[str, Pool] = field(default_factory=dict)
    ipv4_parent: str | None = None
    revision: int = 0
    created_at: object = None

    def blocks(self) -> tuple[Prefix, ...]:
        """The blocks, IPv6 (primary) first."""
        if self.ipv4_block is None:
            return (self.block.cidr,)
        return (self.block.cidr, self.ipv4_block.cidr)

    def prefixes(self, role: str) -> tuple[Prefix, ...]:
        """A role's prefixes, IPv6 (primary) first: the dual-stack list Kubernetes takes."""
        out = [self.pools[role].cidr]
        if role in self.ipv4_pools:
            out.append(self.ipv4_pools[role].cidr)
        return tuple(out)

    def role_pools(self) -> Iterator[Pool]:
        """Every role pool, IPv6 first."""
        yield from self.pools.values()
        yield from self.ipv4_pools.values()


@dataclass(frozen=True, slots=True)
class EgressIdentity:
    """An application identity as Cilium selects workloads: a namespace and pod labels."""

    namespace: str
    labels: Mapping[str, str]

    @property
    def owner(self) -> str:
        """The owner of its egress allocations: ``egress/<namespace>/<k=v,...>`` (sorted)."""
        return f"egress/{self.namespace}/" + ",".join(
            f"{k}={v}" for k, v in sorted(self.labels.items())
        )

    def allocation_labels(self) -> dict[str, str]:
        """The labels its allocations carry: the pod labels and Cilium's namespace label."""
        return {**self.labels, NAMESPACE_LABEL: self.namespace}

    @classmethod
    def of(cls, allocation: Allocation) -> EgressIdentity:
        """The identity an egress allocation was made for."""
        labels = dict(allocation.labels)
        namespace = labels.pop(NAMESPACE_LABEL, "")
        return cls(namespace, labels)


# Cilium's synthetic label for a pod's namespace (CiliumEgressGatewayPolicy podSelector).
NAMESPACE_LABEL: Final = "io.kubernetes.pod.namespace"


def node_key(owner: str, sequence: int) -> str:
    """The idempotency key of an owner's ``sequence``-th allocation in a role pool.

    Concurrent requests for the same node (or Service, or identity) compute the same key, so
    only one allocation is made; after a release the sequence moves on and a new one may be.
    """
    digest = hashlib.blake2b(owner.encode(), digest_size=16).hexdigest()
    return f"{owner.split('/', 1)[0]}#{sequence}:{digest}"
