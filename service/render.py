"""Bootstrap configuration for a planned cluster, rendered as YAML text: pure, no I/O.

A :class:`~service.clusters.Cluster` knows its prefixes and settings; this module turns
them into what the tools that build the cluster read (research notes, design C):

=================  ============================================================================
``kubeadm``        ``kubeadm.k8s.io/v1beta4`` ``ClusterConfiguration``: networking and the
                   kube-controller-manager flags kubeadm does not derive itself
``kcm-flags``      kube-controller-manager flags as a YAML list (a static pod's ``command``)
``cilium-values``  Helm values for the Cilium chart: families, routing, masquerading, IPAM
``lb-ippool``      one ``cilium.io/v2`` ``CiliumLoadBalancerIPPool`` per Service VIP kipam holds
``egress-policy``  one ``cilium.io/v2`` ``CiliumEgressGatewayPolicy`` per egress allocation
``service-cidr``   one ``networking.k8s.io/v1`` ``ServiceCIDR`` over the service pools
=================  ============================================================================

Dual-stack lists are IPv6 first, the primary family, as :meth:`Cluster.prefixes` orders them.

The text is deterministic: the same cluster (and egress allocations, in any order) renders to
the same bytes. Keys come in a fixed order chosen for reading (identity, then networking,
then the rest), label maps are sorted, every CIDR and address - and any other string YAML
could read as something else, such as a ``"true"`` flag value or the ``"No"`` enum - is
double-quoted, and the first line says who rendered it from which revision. The shapes are
checked against the Cilium chart's ``values.yaml``/``values.schema.json``, the Cilium CRDs
and the Kubernetes schemas kept under ``tests/data/upstream`` (see
``tests/service/test_render.py``).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Final, NamedTuple

import yaml

from service.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from engine import Prefix
    from service.clusters import Cluster, EgressIdentity

__all__ = ["MANAGED_BY", "TARGETS", "check_target", "render"]

TARGETS: Final = (
    "kubeadm",
    "kcm-flags",
    "cilium-values",
    "lb-ippool",
    "egress-policy",
    "service-cidr",
)
# The labels every rendered Kubernetes object carries, so `kubectl get -l` finds kipam's own.
MANAGED_BY: Final = "kipam"
_MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
_CLUSTER_LABEL: Final = "kipam.io/cluster"
# Egress policies say whose they are in an annotation (owners do not fit label values).
_OWNER_ANNOTATION: Final = "kipam.io/owner"
# Egress policy names carry a hash of the owner (its pod labels do not fit a name): 10 hex
# digits (40 bits) keep collisions between one cluster's identities out of reach.
_HASH_BYTES: Final = 5
# Cilium's default route per family: egress policies select all traffic of the egress
# address's family (a policy's destinationCIDRs must match its egressIP's family).
_ANY: Final = {6: "::/0", 4: "0.0.0.0/0"}


def render(
    cluster: Cluster,
    target: str,
    *,
    egress: Sequence[tuple[EgressIdentity, Prefix]] = (),
    vips: Sequence[tuple[str, str, Prefix]] = (),
) -> str:
    """The YAML text of one bootstrap target for ``cluster``.

    Args:
        cluster: The planned cluster.
        target: One of :data:`TARGETS`.
        egress: The cluster's egress allocations, ``(identity, address)`` with a host prefix
            from its egress pools; only ``egress-policy`` reads them. Their order does not
            matter: policies come sorted by the identity's owner, IPv6 first.
        vips: The Service VIPs kipam holds, ``(namespace, service, address)``; only
            ``lb-ippool`` reads them: one pool per Service, sorted by namespace and name.

    Returns:
        A comment line naming the cluster and its revision, then the document. For
        ``egress-policy`` and ``lb-ippool``, a stream of ``---`` documents; with no egress
        allocations (or VIPs), the comment line alone (there is nothing to apply).

    Raises:
        InvalidRequestError: an unknown target (field ``target``); for ``egress-policy`` an
            address that is not a single address in the cluster's egress pools, or one
            identity given two addresses of one family (field ``egress``); a dual-stack
            cluster without its IPv4 pools (field ``cluster``).
    """
    check_target(target)
    build = _BUILDERS[target]
    header = (
        f"# Rendered by kipam for cluster {cluster.name} (revision {cluster.revision}); "
        "do not edit, re-render.\n"
    )
    documents = build(cluster, _Holders(egress, vips))
    if not documents:
        return header
    if target in {"egress-policy", "lb-ippool"}:
        return header + "".join("---\n" + _dump(doc) for doc in documents)
    return header + _dump(documents[0])


def check_target(target: str) -> None:
    """Refuse a target that is not one of :data:`TARGETS`.

    Raises:
        InvalidRequestError: an unknown target (field ``target``), listing the targets.
    """
    if target not in _BUILDERS:
        raise InvalidRequestError(
            f"unknown render target {target!r}; the targets are: {', '.join(TARGETS)}.",
            field="target",
        )


# -- targets ------------------------------------------------------------------------------------


class _Holders(NamedTuple):
    """What the cluster's controllers hold, for the targets that list it."""

    egress: Sequence[tuple[EgressIdentity, Prefix]]
    vips: Sequence[tuple[str, str, Prefix]]


def _kubeadm(cluster: Cluster, _holders: _Holders) -> list[object]:
    """``ClusterConfiguration``: kubeadm derives ``--cluster-cidr`` and the service range."""
    settings = cluster.settings
    return [
        {
            "apiVersion": "kubeadm.k8s.io/v1beta4",
            "kind": "ClusterConfiguration",
            "clusterName": cluster.name,
            "networking": {
                "podSubnet": _joined(_prefixes(cluster, "pod")),
                "serviceSubnet": _joined(_prefixes(cluster, "service")),
                "dnsDomain": settings.dns_domain,
            },
            "controllerManager": {
                # v1beta4 turned extraArgs maps into lists of {name, value}.
                "extraArgs": [{"name": name, "value": value} for name, value in _kcm(cluster)],
            },
        }
    ]


def _kcm_flags(cluster: Cluster, _holders: _Holders) -> list[object]:
    """The same choices as flags, for a kube-controller-manager run without kubeadm."""
    flags = [
        ("allocate-node-cidrs", _bool(cluster.settings.allocate_node_cidrs)),
        ("cluster-cidr", _joined(_prefixes(cluster, "pod"))),
        ("service-cluster-ip-range", _joined(_prefixes(cluster, "service"))),
        *_mask_sizes(cluster),
    ]
    return [[f"--{name}={value}" for name, value in flags]]


def _cilium_values(cluster: Cluster, _holders: _Holders) -> list[object]:
    """Helm values; every key exists in the pinned chart (checked by the tests)."""
    settings = cluster.settings
    pods = _prefixes(cluster, "pod")
    dual = len(pods) == 2
    values: dict[str, object] = {
        "ipv4": {"enabled": dual},
        "ipv6": {"enabled": True},
        "routingMode": settings.routing_mode,
    }
    if settings.routing_mode == "native":
        # Traffic to the pod prefix is routed as is, never SNATed.
        values["ipv6NativeRoutingCIDR"] = str(pods[0])
        if dual:
            values["ipv4NativeRoutingCIDR"] = str(pods[1])
        values["autoDirectNodeRoutes"] = settings.auto_direct_node_routes
    values["enableIPv6Masquerade"] = settings.ipv6_masquerade
    if dual:
        values["enableIPv4Masquerade"] = settings.ipv4_masquerade
    ipam: dict[str, object] = {"mode": settings.ipam_mode}
    values["ipam"] = ipam
    if settings.ipam_mode == "cluster-pool":
        # The Cilium operator slices the pod prefix into per-node prefixes.
        operator: dict[str, object] = {
            "clusterPoolIPv6PodCIDRList": [str(pods[0])],
            "clusterPoolIPv6MaskSize": settings.node_length(6),
        }
        if dual:
            operator["clusterPoolIPv4PodCIDRList"] = [str(pods[1])]
            operator["clusterPoolIPv4MaskSize"] = settings.node_length(4)
        ipam["operator"] = operator
    else:
        # The agent waits for Node.spec.podCIDRs (written by kipam or kube-controller-manager).
        k8s: dict[str, object] = {"requireIPv6PodCIDR": True}
        if dual:
            k8s["requireIPv4PodCIDR"] = True
        values["k8s"] = k8s
    if settings.egress_gateway:
        # What the egress gateway requires (research notes section 2.2): BPF masquerading
        # and kube-proxy replacement (check_settings refuses plans without them).
        values["egressGateway"] = {"enabled": True}
        values["bpf"] = {"masquerade": True}
    values["kubeProxyReplacement"] = settings.kube_proxy_replacement
    if settings.kube_proxy_replacement:
        # Without kube-proxy the agent must find the apiserver itself: "auto" reads it from
        # kubeadm's cluster-info ConfigMap.
        values["k8sServiceHost"] = "auto"
    return [values]


def _lb_ippool(cluster: Cluster, holders: _Holders) -> list[object]:
    """One LB-IPAM pool per Service VIP kipam holds, selecting that Service only.

    kipam is the VIP allocator: each pool holds exactly the Service's addresses (a /128, and
    a /32 on dual-stack), so Cilium's LB-IPAM assigns them to that Service and nothing else
    (no address kipam has not handed out, no collision with a later kipam allocation).
    """
    pools = _prefixes(cluster, "ingress")
    by_service: dict[tuple[str, str], list[Prefix]] = {}
    for namespace, service, address in holders.vips:
        if not address.is_host or not any(pool.contains(address) for pool in pools):
            raise InvalidRequestError(
                f"VIP {address} of {namespace}/{service} is not a single address in the "
                f"ingress pools of cluster {cluster.name} ({_joined(pools)}).",
                field="vips",
            )
        by_service.setdefault((namespace, service), []).append(address)
    docs: list[object] = []
    for (namespace, service), addresses in sorted(by_service.items()):
        owner = f"service/{namespace}/{service}"
        docs.append(
            {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumLoadBalancerIPPool",
                "metadata": {
                    "name": f"{cluster.name}-vip-{_digest(owner)}",
                    "labels": _labels(cluster),
                    "annotations": {_OWNER_ANNOTATION: owner},
                },
                "spec": {
                    # IPv6 (primary) first.
                    "blocks": [
                        {"cidr": str(a)} for a in sorted(addresses, key=lambda a: -a.version)
                    ],
                    # LB-IPAM's special Service labels (lb-ipam.rst): this Service only.
                    "serviceSelector": {
                        "matchLabels": {
                            "io.kubernetes.service.name": service,
                            "io.kubernetes.service.namespace": namespace,
                        }
                    },
                    # Set explicitly (the default changed in 1.16): the block is the one VIP.
                    "allowFirstLastIPs": "Yes",
                },
            }
        )
    return docs


def _egress_policies(cluster: Cluster, holders: _Holders) -> list[object]:
    """One egress gateway policy per allocation, sorted by owner, IPv6 first."""
    egress = holders.egress
    pools = _prefixes(cluster, "egress")
    seen: set[tuple[str, int]] = set()
    docs: list[tuple[tuple[str, int], object]] = []
    gateway = _sorted(cluster.settings.gateway_labels())
    for identity, address in egress:
        if not address.is_host or not any(pool.contains(address) for pool in pools):
            raise InvalidRequestError(
                f"egress address {address} of {identity.owner} is not a single address in "
                f"the egress pools of cluster {cluster.name} ({_joined(pools)}).",
                field="egress",
            )
        key = (identity.owner, address.version)
        if key in seen:
            raise InvalidRequestError(
                f"{identity.owner} has two IPv{address.version} egress addresses; a policy "
                "takes one per family.",
                field="egress",
            )
        seen.add(key)
        digest = _digest(identity.owner)
        suffix = "" if address.version == 6 else "-ipv4"
        policy = {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEgressGatewayPolicy",
            "metadata": {
                "name": f"{cluster.name}-egress-{digest}{suffix}",
                "labels": _labels(cluster),
                "annotations": {_OWNER_ANNOTATION: identity.owner},
            },
            "spec": {
                "selectors": [
                    {"podSelector": {"matchLabels": _sorted(identity.allocation_labels())}}
                ],
                "destinationCIDRs": [_ANY[address.version]],
                "egressGateway": {
                    "nodeSelector": {"matchLabels": gateway},
                    "egressIP": address.address,
                },
            },
        }
        # IPv6 (primary) before IPv4 for the same owner: sort on the negated version.
        docs.append(((identity.owner, -address.version), policy))
    return [doc for _, doc in sorted(docs, key=lambda pair: pair[0])]


def _service_cidr(cluster: Cluster, _holders: _Holders) -> list[object]:
    """The service pools as a ServiceCIDR (Kubernetes 1.33+), IPv6 first."""
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "ServiceCIDR",
            "metadata": {"name": cluster.name, "labels": _labels(cluster)},
            "spec": {"cidrs": [str(p) for p in _prefixes(cluster, "service")]},
        }
    ]


_BUILDERS: Final[Mapping[str, Callable[[Cluster, _Holders], list[object]]]] = {
    "kubeadm": _kubeadm,
    "kcm-flags": _kcm_flags,
    "cilium-values": _cilium_values,
    "lb-ippool": _lb_ippool,
    "egress-policy": _egress_policies,
    "service-cidr": _service_cidr,
}


# -- helpers ------------------------------------------------------------------------------------


def _prefixes(cluster: Cluster, role: str) -> tuple[Prefix, ...]:
    """A role's prefixes, IPv6 first; both families for a dual-stack cluster."""
    prefixes = cluster.prefixes(role)
    if cluster.settings.dual_stack and len(prefixes) != 2:
        raise InvalidRequestError(
            f"cluster {cluster.name} is dual-stack but has no IPv4 {role} pool.",
            field="cluster",
        )
    return prefixes


def _kcm(cluster: Cluster) -> list[tuple[str, str]]:
    """The kube-controller-manager arguments kubeadm cannot derive from ``networking``."""
    return [
        ("allocate-node-cidrs", _bool(cluster.settings.allocate_node_cidrs)),
        *_mask_sizes(cluster),
    ]


def _mask_sizes(cluster: Cluster) -> list[tuple[str, str]]:
    """``--node-cidr-mask-size-ipv6`` (and ``-ipv4``) when kube-controller-manager slices."""
    if not cluster.settings.allocate_node_cidrs:
        return []
    return [
        (f"node-cidr-mask-size-ipv{p.version}", str(cluster.settings.node_length(p.version)))
        for p in _prefixes(cluster, "pod")
    ]


def _digest(owner: str) -> str:
    """A short stable hash of an owner, for object names (owners do not fit names)."""
    return hashlib.blake2b(owner.encode(), digest_size=_HASH_BYTES).hexdigest()


def _labels(cluster: Cluster) -> dict[str, str]:
    return {_MANAGED_BY_LABEL: MANAGED_BY, _CLUSTER_LABEL: cluster.name}


def _joined(prefixes: Sequence[Prefix]) -> str:
    """Prefixes as Kubernetes's comma-separated dual-stack list."""
    return ",".join(str(p) for p in prefixes)


def _bool(value: bool) -> str:  # noqa: FBT001 - a plain converter
    return "true" if value else "false"


def _sorted(labels: Mapping[str, str]) -> dict[str, str]:
    """A label map in key order, whatever order it was built in."""
    return {key: labels[key] for key in sorted(labels)}


# -- YAML ---------------------------------------------------------------------------------------

_STR_TAG: Final = "tag:yaml.org,2002:str"
# Strings written plain: a letter, then letters, digits and ``. _ / -`` (names, label keys and
# values, enum words). Anything else - every CIDR and address, numbers, flags, ``"true"``,
# ``"No"`` - is double-quoted, so no YAML reader takes it for another type.
_PLAIN: Final = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, with one quoting rule for strings (:data:`_PLAIN`)."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # A plain scalar that YAML reads back as itself; "No", "true" or "null" read otherwise.
    plain = _PLAIN.fullmatch(data) is not None and yaml.safe_load(data) == data
    return dumper.represent_scalar(_STR_TAG, data, style=None if plain else '"')


_Dumper.add_representer(str, _represent_str)


def _dump(document: object) -> str:
    """One document in block style, keys in the order built, no line folding."""
    return yaml.dump(
        document,
        Dumper=_Dumper,
        default_flow_style=False,
        sort_keys=False,
        allow_unicode=False,
        width=1 << 16,
        indent=2,
    )
