"""Kubernetes and Cilium prefix rules, checked before a cluster plan is committed or rendered.

Each ``check_*`` function is pure and returns a list of :class:`~engine.errors.Violation`,
empty when the input is fine, so that a caller can collect every broken rule of a plan at
once and show them together; :func:`require` turns a non-empty list into a
:class:`~engine.errors.ClusterCheckError` (kind INVALID). Nothing here raises for a bad
plan, only for a bad argument (an alignment of less than one bit).

Every violation names a short stable rule id, a full sentence with the numbers involved and
what would satisfy the rule, and the upstream source the rule mirrors:

- ``node-mask-shorter-than-cluster``: kube-controller-manager ``node_ipam_controller.go``,
  kubeadm ``ValidatePodSubnetNodeMask``;
- ``node-mask-too-long``: Cilium cidrset ``ErrSubNetMaskSizeInvalid``;
- ``node-mask-diff``: cidrset ``clusterSubnetMaxDiff``, kubeadm ``PodSubnetNodeMaskMaxDiff``
  (16 bits);
- ``service-range-too-large``: kube-apiserver ``maxCIDRBits``, kubeadm
  ``MaximumBitsForServiceSubnet`` (20 host bits);
- ``service-range-too-small``: kubeadm ``MinimumAddressesInServiceSubnet`` and ``GetDNSIP``;
- ``family-count-max``, ``family-count-per-family``: ValidateNode ("may specify no more than
  one CIDR for each IP family"), kube-controller-manager and kube-apiserver (at most 2);
- ``family-duplicate``: ValidateNode ``field.Duplicate`` on ``spec.podCIDRs``;
- ``alignment``: RFC 3596 section 2.5 (nibble zones), RIPE NCC 4-bit boundaries;
- ``special-purpose``: IANA special-purpose address registries (RFC 6890 and updates);
- ``ula-global-id-zero``: RFC 4193 section 3.2.2 (pseudo-random Global ID);
- ``role-overlap``: research/k8s-cilium.md section 7, kube-controller-manager
  ``filterOutServiceRange``;
- ``role-outside-block``: DESIGN.md "cluster" (the block holds the role pools).

The numeric rules were read from the upstream sources (kubernetes/kubernetes and
cilium/cilium); the exact upstream error strings are quoted in the references.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from engine._prefix import Prefix
from engine.errors import ClusterCheckError, PolicyViolationError, Violation

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "CLUSTER_SUBNET_MAX_DIFF",
    "DEFAULT_ALIGNMENT_BITS",
    "DEFAULT_NODE_LENGTHS",
    "DNS_SERVICE_INDEX",
    "KUBERNETES_SERVICE_INDEX",
    "POD_ROLE",
    "RECOMMENDED_IPV6_SERVICE_LENGTH",
    "SERVICE_MAX_HOST_BITS",
    "SERVICE_ROLE",
    "SPECIAL_PURPOSE_RANGES",
    "ClusterPlan",
    "SpecialRange",
    "check_alignment",
    "check_cluster",
    "check_disjoint",
    "check_family_count",
    "check_node_mask",
    "check_service_range",
    "check_special_purpose",
    "require",
]

# -- upstream constants -------------------------------------------------------------------------

# kubernetes pkg/controller/nodeipam/ipam/cidrset/cidr_set.go clusterSubnetMaxDiff = 16 ("limited
# to 16 due to the uncompressed bitmap", kubernetes/kubernetes#44918); the same value is kubeadm's
# PodSubnetNodeMaskMaxDiff (cmd/kubeadm/app/constants/constants.go) and Cilium's copy of cidrset.
CLUSTER_SUBNET_MAX_DIFF: Final = 16
# kube-apiserver cmd/kube-apiserver/app/options/validation.go `const maxCIDRBits = 20`, and kubeadm
# MaximumBitsForServiceSubnet = 20: at most 2**20 service addresses while the legacy bitmap
# allocator may run (it is skipped only with MultiCIDRServiceAllocator and
# DisableAllocatorDualWrite both on, the default from Kubernetes 1.34).
SERVICE_MAX_HOST_BITS: Final = 20
# kube-apiserver gives the `kubernetes.default` Service the first address after the network
# address (GetIndexedIP(serviceClusterIPRange, 1)); kubeadm's GetDNSIP puts kube-dns on index 10
# ("Selects the 10th IP in service subnet CIDR range as dnsIP").
KUBERNETES_SERVICE_INDEX: Final = 1
DNS_SERVICE_INDEX: Final = 10
# kubeadm's comment on MaximumBitsForServiceSubnet: "anything in between /108 and /112 will be
# clamped to /112 due to the limitations of the underlying allocation logic".
RECOMMENDED_IPV6_SERVICE_LENGTH: Final = 112
# Nibble boundaries: one ip6.arpa label per 4 bits (RFC 3596 section 2.5).
DEFAULT_ALIGNMENT_BITS: Final = 4
# kubeadm getClusterNodeMask / kube-controller-manager defaults for --node-cidr-mask-size-ipv4
# and --node-cidr-mask-size-ipv6, used when a plan does not name a node mask for a family.
DEFAULT_NODE_LENGTHS: Final[Mapping[int, int]] = MappingProxyType({4: 24, 6: 64})

POD_ROLE: Final = "pod"
SERVICE_ROLE: Final = "service"

_NODE_MASK_REF_V6: Final = (
    "kubernetes pkg/controller/nodeipam/ipam/cidrset/cidr_set.go clusterSubnetMaxDiff "
    '(ErrCIDRSetSubNetTooBig "New CIDR set failed; the node CIDR size is too big"); '
    "cmd/kubeadm/app/constants/constants.go PodSubnetNodeMaskMaxDiff; "
    "cilium pkg/ipam/cidrset/cidr_set.go clusterSubnetMaxDiff "
    "(cluster-pool clusterPoolIPv6MaskSize)"
)
_NODE_MASK_REF_V4: Final = (
    "kubeadm cmd/kubeadm/app/apis/kubeadm/validation/validation.go ValidatePodSubnetNodeMask "
    '("pod subnet mask (%d) and node-mask (%d) difference is greater than %d"), '
    "cmd/kubeadm/app/constants/constants.go PodSubnetNodeMaskMaxDiff "
    "(kube-controller-manager's cidr_set.go applies clusterSubnetMaxDiff to IPv6 only)"
)
_NODE_SHORTER_REF: Final = (
    'kubernetes pkg/controller/nodeipam/node_ipam_controller.go ("Controller: Invalid '
    "--cluster-cidr, mask size of cluster CIDR must be less than or equal to "
    '--node-cidr-mask-size configured for CIDR family"); kubeadm ValidatePodSubnetNodeMask '
    '("the size of pod subnet with mask %d is smaller than the size of node subnet with mask %d")'
)
_NODE_TOO_LONG_REF: Final = (
    'cilium pkg/ipam/cidrset/cidr_set.go ErrSubNetMaskSizeInvalid ("SubNetMask is invalid, '
    'should be lower or equal to 32 for IPv4 and to 128 for IPv6")'
)
_SERVICE_LARGE_REF: Final = (
    "kubernetes cmd/kube-apiserver/app/options/validation.go maxCIDRBits "
    '("specified --service-cluster-ip-range is too large; for %d-bit addresses, the mask must '
    'be >= %d"); cmd/kubeadm/app/constants/constants.go MaximumBitsForServiceSubnet'
)
_SERVICE_SMALL_REF: Final = (
    "kubeadm cmd/kubeadm/app/constants/constants.go MinimumAddressesInServiceSubnet and "
    'GetDNSIP ("unable to get tenth IP address from service subnet CIDR"); kube-apiserver '
    "gives kubernetes.default index 1 of the service range"
)
_FAMILY_REF: Final = (
    'kubernetes pkg/apis/core/validation/validation.go ValidateNode ("may specify no more than '
    'one CIDR for each IP family"); cmd/kube-controller-manager/app/core.go ("more than max '
    'allowed of 2"); cmd/kube-apiserver/app/options/validation.go ("--service-cluster-ip-range '
    'must not contain more than two entries")'
)
_DUPLICATE_REF: Final = (
    "kubernetes pkg/apis/core/validation/validation.go ValidateNode "
    "(field.Duplicate: PodCIDRs must not contain duplicates)"
)
_ALIGNMENT_REF: Final = (
    "RFC 3596 section 2.5 (one ip6.arpa label per 4 bits, so reverse zones delegate on nibble "
    "boundaries); RIPE NCC IPv6 guidance (assignments on 4-bit boundaries)"
)
_ULA_REF: Final = (
    "RFC 4193 section 3.2.2 (the 40-bit Global ID must be pseudo-random); cilium "
    "install/kubernetes/cilium/values.yaml ipam.operator.clusterPoolIPv6PodCIDRList, whose "
    'default ["fd00::/104"] lies in fd00::/48'
)
_OVERLAP_REF: Final = (
    "research/k8s-cilium.md section 7 (service, pod, node, LB and egress ranges pairwise "
    "disjoint); kubernetes pkg/controller/nodeipam/ipam/range_allocator.go filterOutServiceRange "
    "(kube-controller-manager only carves the service range out of --cluster-cidr)"
)
_OUTSIDE_REF: Final = (
    'DESIGN.md "cluster" (one block plus its five role pools); research/k8s-cilium.md section 7 '
    "(node prefix inside its cluster prefix)"
)


# -- the special-purpose registry ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """One entry of :data:`SPECIAL_PURPOSE_RANGES`: a range kipam never allocates from.

    Attributes:
        prefix: The range.
        name: Its registry name.
        rfc: The RFC (and section) that defines it.
        documentation: Whether it is a documentation range, accepted with
            ``allow_documentation=True`` (tests and examples).
    """

    prefix: Prefix
    name: str
    rfc: str
    documentation: bool = False


def _prefix(text: str) -> Prefix:
    # Through ipaddress rather than parse_prefix: the latter (rightly) refuses ::ffff:0:0/96.
    network = ipaddress.ip_network(text)
    return Prefix.of(network.version, int(network.network_address), network.prefixlen)


def _special(text: str, name: str, rfc: str, *, documentation: bool = False) -> SpecialRange:
    return SpecialRange(_prefix(text), name, rfc, documentation)


# The IANA IPv6 and IPv4 Special-Purpose Address Registries (RFC 6890 and its updates) cut down to
# the entries a cluster must never be carved from, plus the non-unicast blocks of the address
# space registries (multicast, deprecated site-local, reserved class E). Two things to know:
# - 2001:db8::/32 is *not* inside 2001::/23 (that one ends at 2001:1ff:ffff:...), so they are
#   two separate entries and a prefix can overlap either one alone, or both (2001::/16).
# - ULA fc00::/7, RFC 1918 space and 100.64.0.0/10 are deliberately absent: they are normal
#   choices for cluster ranges. The zero ULA Global ID (fd00::/48) is its own rule.
SPECIAL_PURPOSE_RANGES: Final[tuple[SpecialRange, ...]] = (
    _special("::/128", "Unspecified Address", "RFC 4291 section 2.5.2"),
    _special("::1/128", "Loopback Address", "RFC 4291 section 2.5.3"),
    _special("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291 section 2.5.5.2"),
    _special("64:ff9b::/96", "IPv4-IPv6 Translation (well-known prefix)", "RFC 6052"),
    _special("64:ff9b:1::/48", "IPv4-IPv6 Translation (local use)", "RFC 8215"),
    _special("100::/64", "Discard-Only Address Block", "RFC 6666"),
    _special("2001::/23", "IETF Protocol Assignments", "RFC 2928"),
    _special("2001:db8::/32", "Documentation", "RFC 3849", documentation=True),
    _special("3fff::/20", "Documentation", "RFC 9637", documentation=True),
    _special("2002::/16", "6to4", "RFC 3056"),
    _special("fe80::/10", "Link-Local Unicast", "RFC 4291 section 2.5.6"),
    _special("fec0::/10", "Site-Local Unicast (deprecated)", "RFC 3879"),
    _special("ff00::/8", "Multicast", "RFC 4291 section 2.7"),
    _special("0.0.0.0/8", '"This network"', "RFC 791 section 3.2"),
    _special("127.0.0.0/8", "Loopback", "RFC 1122 section 3.2.1.3"),
    _special("169.254.0.0/16", "Link Local", "RFC 3927"),
    _special("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890 section 2.1"),
    _special("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", documentation=True),
    _special("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", documentation=True),
    _special("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", documentation=True),
    _special("198.18.0.0/15", "Benchmarking", "RFC 2544"),
    _special("224.0.0.0/4", "Multicast", "RFC 5771"),
    _special("240.0.0.0/4", "Reserved", "RFC 1112 section 4"),
    _special("255.255.255.255/32", "Limited Broadcast", "RFC 919 section 7"),
)

# fd00::/48: the ULA block whose 40-bit Global ID is all zeros.
_ULA_ZERO_GLOBAL_ID: Final = _prefix("fd00::/48")


# -- helpers ------------------------------------------------------------------------------------


def _family(version: int) -> str:
    return f"IPv{version}"


def _relation(a: Prefix, b: Prefix) -> str:
    """How ``a`` relates to ``b``, which it overlaps, as words for a message."""
    if a == b:
        return "is"
    if a.contains(b):
        return "contains"
    return "is inside"


def _alignment_violation(what: str, length: int, bits: int, alignment_bits: int) -> Violation:
    shorter = length - length % alignment_bits
    longer = shorter + alignment_bits
    choices = f"/{shorter} or /{longer}" if longer <= bits else f"/{shorter}"
    return Violation(
        "alignment",
        f"{what} does not end on a {alignment_bits}-bit boundary; aligned lengths map to whole "
        f"reverse DNS zones and keep the address plan readable: use {choices}.",
        _ALIGNMENT_REF,
    )


def _check_alignment_bits(alignment_bits: int) -> None:
    if alignment_bits < 1:
        raise PolicyViolationError(
            f"alignment_bits must be at least 1 (1 means no alignment), not {alignment_bits}."
        )


# -- the checks ---------------------------------------------------------------------------------


def check_node_mask(
    cluster: Prefix, node_length: int, *, max_diff: int | None = CLUSTER_SUBNET_MAX_DIFF
) -> list[Violation]:
    """Check the per-node mask against the cluster prefix it is carved from.

    The cluster prefix is what kube-controller-manager calls ``--cluster-cidr`` (kubeadm's
    ``podSubnet``, Cilium's ``clusterPoolIPv6PodCIDRList`` entry); ``node_length`` is
    ``--node-cidr-mask-size-ipv4/-ipv6`` (Cilium ``clusterPoolIPv6MaskSize``). The node length
    must lie in ``[cluster.length, min(cluster.length + 16, bits)]``.

    What upstream does, read from the source: kube-controller-manager's
    ``pkg/controller/nodeipam/ipam/cidrset/cidr_set.go`` ``NewCIDRSet`` refuses
    ``node - cluster > clusterSubnetMaxDiff`` (16) **for IPv6 only**
    (``clusterCIDR.IP.To4() == nil``); for IPv4 it takes any difference (its own tests use
    ``127.0.0.0/8`` with ``/32`` nodes). Cilium's copy (``pkg/ipam/cidrset/cidr_set.go``) does
    the same and also refuses a mask longer than 32 or 128 bits. kubeadm's
    ``ValidatePodSubnetNodeMask`` applies ``PodSubnetNodeMaskMaxDiff = 16`` to **both**
    families (unless ``allocate-node-cidrs`` is ``"false"``), and ``node_ipam_controller.go``
    refuses a node mask shorter than the cluster mask for both. kipam renders kubeadm
    configuration, so the 16-bit rule applies to both families here; each violation's
    reference names the upstream that enforces it for that family.

    The 16-bit rule belongs to the slicers (kube-controller-manager's and the Cilium operator's
    cidrset) and to kubeadm's check, which kubeadm skips when ``allocate-node-cidrs`` is
    ``"false"``. When something else hands out node prefixes (kipam's own node IPAM writing
    ``Node.spec.podCIDRs``), pass ``max_diff=None``: only the mask bounds remain.

    Args:
        cluster: The prefix node ranges are carved from.
        node_length: The prefix length each node gets.
        max_diff: The largest allowed difference in bits, or None for no limit.

    Returns:
        At most one violation: ``node-mask-shorter-than-cluster``, ``node-mask-too-long`` or
        ``node-mask-diff``.
    """
    longest = min(cluster.length + (cluster.bits if max_diff is None else max_diff), cluster.bits)
    if node_length < cluster.length:
        return [
            Violation(
                "node-mask-shorter-than-cluster",
                f"node mask /{node_length} is shorter than cluster prefix {cluster}, so a node's "
                f"range would not fit inside it: use a node mask from /{cluster.length} to "
                f"/{longest}.",
                _NODE_SHORTER_REF,
            )
        ]
    if node_length > cluster.bits:
        return [
            Violation(
                "node-mask-too-long",
                f"node mask /{node_length} is longer than an {_family(cluster.version)} address "
                f"({cluster.bits} bits): use a node mask from /{cluster.length} to /{longest}.",
                _NODE_TOO_LONG_REF,
            )
        ]
    diff = node_length - cluster.length
    if max_diff is not None and diff > max_diff:
        enforcer = "kube-controller-manager" if cluster.version == 6 else "kubeadm"
        return [
            Violation(
                "node-mask-diff",
                f"node mask /{node_length} is {diff} bits longer than cluster prefix {cluster}; "
                f"{enforcer} allows at most {max_diff}: use a cluster prefix of "
                f"/{node_length - max_diff} or longer, or a node mask of "
                f"/{cluster.length + max_diff} or shorter.",
                _NODE_MASK_REF_V6 if cluster.version == 6 else _NODE_MASK_REF_V4,
            )
        ]
    return []


def check_service_range(prefix: Prefix, *, legacy_allocator: bool = True) -> list[Violation]:
    """Check a service range (``--service-cluster-ip-range``, kubeadm ``serviceSubnet``).

    While the legacy bitmap allocator may be active (kube-apiserver before 1.34, or any
    kubeadm, whose validation does not read the apiserver's feature gates), a range may have at
    most 20 host bits: ``/12`` or longer for IPv4, ``/108`` or longer for IPv6. The bitmap
    tracks at most 65,536 IPv6 addresses, so ``/112`` is the recommended IPv6 size. In every
    case the range must hold index 1 (``kubernetes.default``) and index 10 (kube-dns under
    kubeadm), that is at least 16 addresses.

    Args:
        prefix: The service range.
        legacy_allocator: Whether the legacy 20-bit limit applies. Pass ``False`` only for
            kube-apiservers of 1.34 or later whose ranges are extended with ServiceCIDR objects
            and that are not validated by kubeadm.

    Returns:
        ``service-range-too-large`` and/or ``service-range-too-small`` violations.
    """
    violations: list[Violation] = []
    host_bits = prefix.bits - prefix.length
    if legacy_allocator and host_bits > SERVICE_MAX_HOST_BITS:
        minimum = prefix.bits - SERVICE_MAX_HOST_BITS
        if prefix.version == 6:
            advice = (
                f"use a /{RECOMMENDED_IPV6_SERVICE_LENGTH} (the legacy allocator tracks at most "
                f"65,536 addresses, so /{minimum} to /{RECOMMENDED_IPV6_SERVICE_LENGTH - 1} gain "
                "nothing)."
            )
        else:
            advice = f"use a /{minimum} or longer."
        violations.append(
            Violation(
                "service-range-too-large",
                f"service range {prefix} has {host_bits} host bits; while the legacy bitmap "
                f"service IP allocator may be active, kube-apiserver and kubeadm allow at most "
                f"{SERVICE_MAX_HOST_BITS} (for {prefix.bits}-bit addresses the mask must be "
                f">= {minimum}): {advice}",
                _SERVICE_LARGE_REF,
            )
        )
    if prefix.size <= DNS_SERVICE_INDEX:
        needed_bits = DNS_SERVICE_INDEX.bit_length()
        violations.append(
            Violation(
                "service-range-too-small",
                f"service range {prefix} holds only {prefix.size:,} address(es); "
                f"kubernetes.default takes index {KUBERNETES_SERVICE_INDEX} and kubeadm puts "
                f"kube-dns at index {DNS_SERVICE_INDEX}, so it needs at least "
                f"{1 << needed_bits}: use a /{prefix.bits - needed_bits} or shorter.",
                _SERVICE_SMALL_REF,
            )
        )
    return violations


def check_family_count(prefixes: Sequence[Prefix], what: str) -> list[Violation]:
    """Check a dual-stack list: at most 2 entries, at most one per family, no duplicates.

    This is the shape Kubernetes demands of ``--cluster-cidr``, ``--service-cluster-ip-range``,
    ``Node.spec.podCIDRs`` and ``ServiceCIDR.spec.cidrs``. Unlike upstream, a repeated entry is
    reported only as a duplicate, not also as two entries of one family.

    Args:
        prefixes: The list, primary family first.
        what: What the list is, for messages, e.g. ``"--cluster-cidr"`` or ``"the pod role"``.

    Returns:
        ``family-count-max``, ``family-count-per-family`` (one per crowded family) and
        ``family-duplicate`` (one per repeated prefix) violations.
    """
    violations: list[Violation] = []
    if len(prefixes) > 2:
        listed = ", ".join(str(p) for p in prefixes)
        violations.append(
            Violation(
                "family-count-max",
                f"{len(prefixes)} prefixes are given for {what} ({listed}); Kubernetes accepts at "
                "most 2, one IPv4 and one IPv6: keep one prefix per family.",
                _FAMILY_REF,
            )
        )
    distinct: list[Prefix] = []
    for prefix in prefixes:
        if prefix not in distinct:
            distinct.append(prefix)
    for version in (4, 6):
        same = [p for p in distinct if p.version == version]
        if len(same) > 1:
            listed = ", ".join(str(p) for p in same)
            violations.append(
                Violation(
                    "family-count-per-family",
                    f"{len(same)} {_family(version)} prefixes are given for {what} ({listed}); "
                    "Kubernetes may specify no more than one CIDR for each IP family: keep one "
                    f"{_family(version)} prefix.",
                    _FAMILY_REF,
                )
            )
    for prefix in distinct:
        count = prefixes.count(prefix)
        if count > 1:
            violations.append(
                Violation(
                    "family-duplicate",
                    f"{prefix} is given {count} times for {what}; Kubernetes refuses duplicate "
                    "entries: give it once.",
                    _DUPLICATE_REF,
                )
            )
    return violations


def check_alignment(
    prefix: Prefix, alignment_bits: int = DEFAULT_ALIGNMENT_BITS
) -> list[Violation]:
    """Check that the prefix length is a multiple of ``alignment_bits``.

    With the default of 4 (nibble boundaries) every prefix maps to whole ip6.arpa zones
    (RFC 3596 section 2.5) and follows RIPE NCC's advice to assign on 4-bit boundaries. The
    rule is meant for IPv6 (:func:`check_cluster` applies it to IPv6 only) but takes either
    family.

    Args:
        prefix: The prefix to check.
        alignment_bits: The boundary in bits; 1 means no constraint.

    Returns:
        One ``alignment`` violation naming the nearest aligned shorter and longer lengths, or
        nothing.

    Raises:
        PolicyViolationError: ``alignment_bits`` is less than 1.
    """
    _check_alignment_bits(alignment_bits)
    if prefix.length % alignment_bits == 0:
        return []
    return [_alignment_violation(str(prefix), prefix.length, prefix.bits, alignment_bits)]


def check_special_purpose(prefix: Prefix, *, allow_documentation: bool = False) -> list[Violation]:
    """Refuse a prefix that overlaps a special-purpose range, or sits in the zero ULA Global ID.

    Overlap means either direction: a prefix inside a special range, equal to it, or
    containing it (which would let allocations land in it). Every overlapping entry of
    :data:`SPECIAL_PURPOSE_RANGES` is reported. Documentation ranges (``2001:db8::/32``,
    ``3fff::/20``, ``192.0.2.0/24``, ``198.51.100.0/24``, ``203.0.113.0/24``) pass with
    ``allow_documentation=True``. ULA (``fc00::/7``), RFC 1918 and ``100.64.0.0/10`` space is
    fine, except a prefix inside ``fd00::/48``: its Global ID is zero, where RFC 4193 section
    3.2.2 requires a pseudo-random one (Cilium's default ``fd00::/104`` lives there, so such
    clusters collide). A larger ULA block containing ``fd00::/48`` (``fd00::/8``) is a
    container of many sites and passes; what is carved from it is checked in turn.

    Args:
        prefix: The prefix to check.
        allow_documentation: Accept documentation ranges (tests and examples).

    Returns:
        ``special-purpose`` violations, one per overlapping entry, and/or one
        ``ula-global-id-zero`` violation.
    """
    violations: list[Violation] = []
    for entry in SPECIAL_PURPOSE_RANGES:
        if not prefix.overlaps(entry.prefix):
            continue
        if entry.documentation and allow_documentation:
            continue
        if prefix.version == 6:
            advice = (
                "choose a prefix from your own global allocation, or a ULA /48 with a random "
                "Global ID (RFC 4193)"
            )
        else:
            advice = (
                "choose from RFC 1918 space (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16) or "
                "100.64.0.0/10 (RFC 6598)"
            )
        if entry.documentation:
            advice += "; documentation ranges are accepted only for tests (allow_documentation)"
        violations.append(
            Violation(
                "special-purpose",
                f"{prefix} {_relation(prefix, entry.prefix)} {entry.prefix} ({entry.name}, "
                f"{entry.rfc}), which must never be allocated from: {advice}.",
                f"IANA special-purpose address registries (RFC 6890): {entry.prefix} "
                f"{entry.name}, {entry.rfc}",
            )
        )
    if _ULA_ZERO_GLOBAL_ID.contains(prefix):
        violations.append(
            Violation(
                "ula-global-id-zero",
                f"{prefix} {_relation(prefix, _ULA_ZERO_GLOBAL_ID)} {_ULA_ZERO_GLOBAL_ID}, the "
                "ULA block whose Global ID is zero; RFC 4193 section 3.2.2 requires a "
                "pseudo-random 40-bit Global ID so that sites do not collide (Cilium's default "
                "fd00::/104 is here, shared by every cluster that keeps it): use a /48 under "
                "fd00::/8 with 40 random bits after fd, e.g. fd3c:9e12:7a4b::/48.",
                _ULA_REF,
            )
        )
    return violations


def check_disjoint(roles: Mapping[str, Sequence[Prefix]]) -> list[Violation]:
    """Check that the prefixes of different roles share no address.

    Roles are named freely (normally node, pod, service, ingress and egress). Each
    overlapping pair of prefixes from two different roles is reported once, in mapping order;
    prefixes of one role are left to :func:`check_family_count`.

    Args:
        roles: Role name to its prefixes (one per family).

    Returns:
        ``role-overlap`` violations, one per overlapping pair.
    """
    entries = [(role, prefix) for role, prefixes in roles.items() for prefix in prefixes]
    violations: list[Violation] = []
    for i, (role_a, a) in enumerate(entries):
        for role_b, b in entries[i + 1 :]:
            if role_a == role_b or not a.overlaps(b):
                continue
            violations.append(
                Violation(
                    "role-overlap",
                    f"{role_a} prefix {a} {_relation(a, b)} {role_b} prefix {b}; the node, pod, "
                    "service, ingress and egress ranges must not share addresses, or traffic "
                    "meant for one is routed as the other: move one of them to free space.",
                    _OVERLAP_REF,
                )
            )
    return violations


def _default_node_lengths() -> dict[int, int]:
    return dict(DEFAULT_NODE_LENGTHS)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterPlan:
    """A whole cluster's address plan, as :func:`check_cluster` takes it.

    Attributes:
        blocks: The cluster block, one per family (primary family first).
        roles: Role name (``node``, ``pod``, ``service``, ``ingress``, ``egress``) to its
            prefixes, one per family. The ``pod`` role is checked against the node mask, the
            ``service`` role as a service range.
        node_lengths: IP version (4 or 6) to the pod-per-node prefix length; a missing family
            gets the Kubernetes default (/24 for IPv4, /64 for IPv6).
        alignment_bits: Boundary for IPv6 prefixes and the IPv6 node mask; 1 for none. IPv4
            prefixes are not aligned.
        allow_documentation: Accept documentation ranges (tests and examples).
        legacy_allocator: Whether the legacy 20-bit service range limit applies.
        max_node_mask_diff: The node mask rule's limit (16, the cidrset's), or None when
            neither kube-controller-manager nor the Cilium operator slices the pod prefix.
    """

    blocks: Sequence[Prefix]
    roles: Mapping[str, Sequence[Prefix]]
    node_lengths: Mapping[int, int] = field(default_factory=_default_node_lengths)
    alignment_bits: int = DEFAULT_ALIGNMENT_BITS
    allow_documentation: bool = False
    legacy_allocator: bool = True
    max_node_mask_diff: int | None = CLUSTER_SUBNET_MAX_DIFF


def _check_prefix(plan: ClusterPlan, what: str, prefix: Prefix) -> list[Violation]:
    """The checks every block and role prefix gets: special purpose and (IPv6) alignment."""
    violations = check_special_purpose(prefix, allow_documentation=plan.allow_documentation)
    if prefix.version == 6 and prefix.length % plan.alignment_bits != 0:
        violations.append(
            _alignment_violation(
                f"{what} {prefix}", prefix.length, prefix.bits, plan.alignment_bits
            )
        )
    return violations


def _check_inside_blocks(plan: ClusterPlan, role: str, prefix: Prefix) -> list[Violation]:
    blocks = [b for b in plan.blocks if b.version == prefix.version]
    if any(b.contains(prefix) for b in blocks):
        return []
    if blocks:
        listed = ", ".join(str(b) for b in blocks)
        message = (
            f"{role} prefix {prefix} is not inside the cluster block {listed}: carve it from "
            "the block."
        )
    else:
        family = _family(prefix.version)
        message = (
            f"{role} prefix {prefix} is {family} but the cluster has no {family} block: add "
            f"an {family} block that contains it, or drop the prefix."
        )
    return [Violation("role-outside-block", message, _OUTSIDE_REF)]


def _check_pod(plan: ClusterPlan, pod: Prefix) -> list[Violation]:
    node_length = plan.node_lengths.get(pod.version, DEFAULT_NODE_LENGTHS[pod.version])
    violations = check_node_mask(pod, node_length, max_diff=plan.max_node_mask_diff)
    if pod.version == 6 and 0 <= node_length <= pod.bits and node_length % plan.alignment_bits != 0:
        violations.append(
            _alignment_violation(
                f"node mask /{node_length} (pod prefix {pod})",
                node_length,
                pod.bits,
                plan.alignment_bits,
            )
        )
    return violations


def check_cluster(plan: ClusterPlan) -> list[Violation]:
    """Run every check above over a whole cluster plan and return all violations.

    In order: the blocks (family count, special purpose, IPv6 alignment); then each role
    (family count, and for each prefix: inside a block of its family, special purpose, IPv6
    alignment, the service range rules for ``service``, the node mask rules and IPv6 node
    mask alignment for ``pod``); then pairwise disjointness of the roles.

    Args:
        plan: The cluster plan.

    Returns:
        Every violation found; empty when the plan is fine.

    Raises:
        PolicyViolationError: ``plan.alignment_bits`` is less than 1.
    """
    _check_alignment_bits(plan.alignment_bits)
    violations = check_family_count(plan.blocks, "the cluster block")
    for block in plan.blocks:
        violations += _check_prefix(plan, "cluster block", block)
    for role, prefixes in plan.roles.items():
        violations += check_family_count(prefixes, f"the {role} role")
        for prefix in prefixes:
            violations += _check_inside_blocks(plan, role, prefix)
            violations += _check_prefix(plan, f"{role} prefix", prefix)
            if role == SERVICE_ROLE:
                violations += check_service_range(prefix, legacy_allocator=plan.legacy_allocator)
            if role == POD_ROLE:
                violations += _check_pod(plan, prefix)
    violations += check_disjoint(plan.roles)
    return violations


def require(violations: Sequence[Violation]) -> None:
    """Raise if any rule is broken; return quietly otherwise.

    Args:
        violations: What one or more checks returned.

    Raises:
        ClusterCheckError: ``violations`` is not empty; the error carries all of them (kind
            INVALID).
    """
    if violations:
        raise ClusterCheckError(violations)
