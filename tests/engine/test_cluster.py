from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine._prefix import Prefix, parse_prefix
from engine.cluster import (
    CLUSTER_SUBNET_MAX_DIFF,
    DEFAULT_NODE_LENGTHS,
    SPECIAL_PURPOSE_RANGES,
    ClusterPlan,
    check_alignment,
    check_cluster,
    check_disjoint,
    check_family_count,
    check_node_mask,
    check_service_range,
    check_special_purpose,
    require,
)
from engine.errors import ClusterCheckError, ErrorKind, PolicyViolationError, Violation

P = parse_prefix


def rules(violations: list[Violation]) -> list[str]:
    """The rule ids of ``violations``, in order."""
    return [v.rule for v in violations]


# -- check_node_mask ------------------------------------------------------------------------------

NODE_MASK = [
    # (cluster prefix, node length, expected rule ids)
    ("2001:db8::/48", 64, []),
    ("10.0.0.0/8", 24, []),
    ("2001:db8::/48", 65, ["node-mask-diff"]),
    ("10.0.0.0/8", 25, ["node-mask-diff"]),
    ("2001:db8::/64", 64, []),
    ("10.0.0.0/24", 24, []),
    ("2001:db8::/48", 47, ["node-mask-shorter-than-cluster"]),
    ("10.0.0.0/8", 7, ["node-mask-shorter-than-cluster"]),
    ("2001:db8::/48", -1, ["node-mask-shorter-than-cluster"]),
    ("2001:db8::/120", 128, []),
    ("10.0.0.0/24", 32, []),
    ("2001:db8::/120", 129, ["node-mask-too-long"]),
    ("10.0.0.0/24", 33, ["node-mask-too-long"]),
    ("::/0", 0, []),
    ("0.0.0.0/0", 0, []),
    ("::/0", 16, []),
    ("0.0.0.0/0", 16, []),
    ("::/0", 17, ["node-mask-diff"]),
    ("0.0.0.0/0", 17, ["node-mask-diff"]),
    ("fd00::/104", 120, []),
    ("2001:db8::/64", 128, ["node-mask-diff"]),
]


@pytest.mark.parametrize(
    ("cluster", "node_length", "expected"),
    NODE_MASK,
    ids=[f"{c}-node/{n}" for c, n, _ in NODE_MASK],
)
def test_check_node_mask(cluster: str, node_length: int, expected: list[str]) -> None:
    """The node mask lies between the cluster length and 16 bits longer, within the family."""
    assert rules(check_node_mask(P(cluster), node_length)) == expected


def test_node_mask_diff_message_names_the_numbers_and_the_fix() -> None:
    """An IPv6 diff violation says how far over it is and which lengths would satisfy it."""
    (violation,) = check_node_mask(P("2001:db8::/48"), 80)
    assert violation.message == (
        "node mask /80 is 32 bits longer than cluster prefix 2001:db8::/48; "
        "kube-controller-manager allows at most 16: use a cluster prefix of /64 or longer, "
        "or a node mask of /64 or shorter."
    )
    assert "cidr_set.go clusterSubnetMaxDiff" in violation.reference
    assert "PodSubnetNodeMaskMaxDiff" in violation.reference


def test_node_mask_diff_for_ipv4_cites_kubeadm() -> None:
    """For IPv4 only kubeadm enforces the 16-bit rule, and the violation says so."""
    (violation,) = check_node_mask(P("10.0.0.0/8"), 25)
    assert "kubeadm allows at most 16" in violation.message
    assert "/9 or longer" in violation.message
    assert "/24 or shorter" in violation.message
    assert "ValidatePodSubnetNodeMask" in violation.reference
    assert "IPv6 only" in violation.reference


def test_node_mask_without_a_slicer_has_no_diff_limit() -> None:
    """``max_diff=None`` (kipam writes Node.spec.podCIDRs): only the mask bounds remain."""
    assert check_node_mask(P("2001:db8::/56"), 80, max_diff=None) == []
    assert check_node_mask(P("2001:db8::/56"), 128, max_diff=None) == []
    assert rules(check_node_mask(P("2001:db8::/56"), 48, max_diff=None)) == [
        "node-mask-shorter-than-cluster"
    ]
    (violation,) = check_node_mask(P("2001:db8::/56"), 40, max_diff=None)
    assert "/56 to /128" in violation.message
    assert rules(check_node_mask(P("2001:db8::/56"), 80, max_diff=8)) == ["node-mask-diff"]


@pytest.mark.parametrize(
    ("cluster", "node_length", "words"),
    [
        ("2001:db8::/48", 40, ["/40", "2001:db8::/48", "/48 to /64"]),
        ("10.0.0.0/24", 20, ["/20", "10.0.0.0/24", "/24 to /32"]),
        ("2001:db8::/120", 130, ["/130", "IPv6", "128 bits", "/120 to /128"]),
        ("10.0.0.0/24", 40, ["/40", "IPv4", "32 bits", "/24 to /32"]),
    ],
    ids=["v6-shorter", "v4-shorter", "v6-too-long", "v4-too-long"],
)
def test_node_mask_range_messages_name_the_acceptable_range(
    cluster: str, node_length: int, words: list[str]
) -> None:
    """Out-of-range node masks are refused with the range of lengths that would work."""
    (violation,) = check_node_mask(P(cluster), node_length)
    for word in words:
        assert word in violation.message


@given(
    version=st.sampled_from([4, 6]),
    cluster_length=st.integers(min_value=0, max_value=128),
    node_length=st.integers(min_value=-2, max_value=131),
)
def test_node_mask_accepts_exactly_the_documented_window(
    version: int, cluster_length: int, node_length: int
) -> None:
    """A node mask passes iff it is within [cluster, min(cluster + 16, bits)]."""
    bits = 32 if version == 4 else 128
    cluster = Prefix(version, 0, min(cluster_length, bits))
    upper = min(cluster.length + CLUSTER_SUBNET_MAX_DIFF, bits)
    ok = cluster.length <= node_length <= upper
    assert (check_node_mask(cluster, node_length) == []) is ok


# -- check_service_range --------------------------------------------------------------------------

SERVICE = [
    # (service range, legacy allocator, expected rule ids)
    ("2001:db8::/112", True, []),
    ("10.96.0.0/16", True, []),
    ("2001:db8::/108", True, []),
    ("10.96.0.0/12", True, []),
    ("2001:db8::/107", True, ["service-range-too-large"]),
    ("10.96.0.0/11", True, ["service-range-too-large"]),
    ("2001:db8::/107", False, []),
    ("10.96.0.0/11", False, []),
    ("2001:db8::/64", False, []),
    ("10.0.0.0/8", False, []),
    ("::/0", True, ["service-range-too-large"]),
    ("0.0.0.0/0", True, ["service-range-too-large"]),
    ("::/0", False, []),
    ("2001:db8::/124", True, []),
    ("10.96.0.0/28", True, []),
    ("2001:db8::/125", True, ["service-range-too-small"]),
    ("10.96.0.0/29", True, ["service-range-too-small"]),
    ("2001:db8::/128", False, ["service-range-too-small"]),
    ("10.96.0.1/32", False, ["service-range-too-small"]),
]


@pytest.mark.parametrize(
    ("prefix", "legacy", "expected"),
    SERVICE,
    ids=[f"{p}-{'legacy' if legacy else 'new'}" for p, legacy, _ in SERVICE],
)
def test_check_service_range(prefix: str, legacy: bool, expected: list[str]) -> None:
    """Service ranges keep at most 20 host bits under the legacy allocator and hold index 10."""
    assert rules(check_service_range(P(prefix), legacy_allocator=legacy)) == expected


def test_service_range_defaults_to_the_legacy_limit() -> None:
    """Without arguments the 20-bit limit of the legacy bitmap allocator applies."""
    assert rules(check_service_range(P("2001:db8::/64"))) == ["service-range-too-large"]


def test_service_range_too_large_recommends_112_for_ipv6() -> None:
    """The IPv6 message quotes the /108 floor and recommends /112."""
    (violation,) = check_service_range(P("2001:db8::/64"))
    assert "64 host bits" in violation.message
    assert "at most 20" in violation.message
    assert "the mask must be >= 108" in violation.message
    assert "use a /112" in violation.message
    assert "maxCIDRBits" in violation.reference
    assert "MaximumBitsForServiceSubnet" in violation.reference


def test_service_range_too_large_for_ipv4_names_the_floor() -> None:
    """The IPv4 message names /12 as the shortest acceptable length."""
    (violation,) = check_service_range(P("10.0.0.0/8"))
    assert "for 32-bit addresses the mask must be >= 12" in violation.message
    assert "use a /12 or longer" in violation.message


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("2001:db8::/125", ["8 address(es)", "index 1", "index 10", "at least 16", "/124"]),
        ("192.0.2.0/29", ["8 address(es)", "index 1", "index 10", "at least 16", "/28"]),
    ],
    ids=["v6", "v4"],
)
def test_service_range_too_small_explains_the_dns_index(prefix: str, words: list[str]) -> None:
    """A range without room for kube-dns at index 10 is refused with the length that fits."""
    (violation,) = check_service_range(P(prefix))
    for word in words:
        assert word in violation.message
    assert "GetDNSIP" in violation.reference


# -- check_family_count ---------------------------------------------------------------------------

FAMILY = [
    # (prefixes, expected rule ids)
    ([], []),
    (["2001:db8::/48"], []),
    (["10.0.0.0/8"], []),
    (["2001:db8::/48", "10.0.0.0/8"], []),
    (["10.0.0.0/8", "2001:db8::/48"], []),
    (["2001:db8:1::/48", "2001:db8:2::/48"], ["family-count-per-family"]),
    (["10.0.0.0/8", "172.16.0.0/12"], ["family-count-per-family"]),
    (["2001:db8::/48", "2001:db8::/48"], ["family-duplicate"]),
    (["10.0.0.0/8", "10.0.0.0/8"], ["family-duplicate"]),
    (
        ["2001:db8:1::/48", "2001:db8:2::/48", "10.0.0.0/8"],
        ["family-count-max", "family-count-per-family"],
    ),
    (
        ["2001:db8::/48", "10.0.0.0/8", "2001:db8::/48"],
        ["family-count-max", "family-duplicate"],
    ),
    (
        ["10.0.0.0/8", "172.16.0.0/12", "2001:db8:1::/48", "2001:db8:2::/48"],
        ["family-count-max", "family-count-per-family", "family-count-per-family"],
    ),
]


@pytest.mark.parametrize(
    ("prefixes", "expected"),
    FAMILY,
    ids=[",".join(p) or "empty" for p, _ in FAMILY],
)
def test_check_family_count(prefixes: list[str], expected: list[str]) -> None:
    """A dual-stack list has at most two entries, one per family, none repeated."""
    assert rules(check_family_count([P(p) for p in prefixes], "--cluster-cidr")) == expected


def test_family_count_messages_name_the_list_and_the_prefixes() -> None:
    """Each family-count message says which list, which prefixes and what to keep."""
    prefixes = [P("2001:db8:1::/48"), P("2001:db8:2::/48"), P("2001:db8:1::/48")]
    too_many, per_family, duplicate = check_family_count(prefixes, "--cluster-cidr")
    assert too_many.message.startswith("3 prefixes are given for --cluster-cidr")
    assert "at most 2" in too_many.message
    assert per_family.message.startswith("2 IPv6 prefixes are given for --cluster-cidr")
    assert "2001:db8:1::/48, 2001:db8:2::/48" in per_family.message
    assert "no more than one CIDR for each IP family" in per_family.message
    assert duplicate.message.startswith("2001:db8:1::/48 is given 2 times for --cluster-cidr")
    assert "may specify no more than one CIDR for each IP family" in per_family.reference
    assert "Duplicate" in duplicate.reference


# -- check_alignment ------------------------------------------------------------------------------

ALIGNMENT = [
    # (prefix, alignment bits, expected "use ..." choices or None when aligned)
    ("2001:db8::/48", 4, None),
    ("10.0.0.0/24", 4, None),
    ("2001:db8::/50", 4, "/48 or /52"),
    ("10.0.0.0/26", 4, "/24 or /28"),
    ("::/0", 4, None),
    ("0.0.0.0/0", 4, None),
    ("2001:db8::/128", 4, None),
    ("192.0.2.1/32", 4, None),
    ("2001:db8::/127", 4, "/124 or /128"),
    ("192.0.2.0/31", 4, "/28 or /32"),
    ("::/1", 4, "/0 or /4"),
    ("0.0.0.0/1", 4, "/0 or /4"),
    ("2001:db8::/127", 1, None),
    ("192.0.2.0/31", 1, None),
    ("2001:db8::/56", 8, None),
    ("2001:db8::/60", 8, "/56 or /64"),
    ("192.0.2.0/29", 3, "/27 or /30"),
    ("192.0.2.0/31", 3, "/30"),
    ("2001:db8::/127", 3, "/126"),
]


@pytest.mark.parametrize(
    ("prefix", "alignment_bits", "choices"),
    ALIGNMENT,
    ids=[f"{p}-align{a}" for p, a, _ in ALIGNMENT],
)
def test_check_alignment(prefix: str, alignment_bits: int, choices: str | None) -> None:
    """Unaligned lengths are refused naming the nearest aligned lengths within the family."""
    violations = check_alignment(P(prefix), alignment_bits)
    if choices is None:
        assert violations == []
    else:
        (violation,) = violations
        assert violation.rule == "alignment"
        assert violation.message.endswith(f"use {choices}.")
        assert f"{alignment_bits}-bit boundary" in violation.message
        assert "RFC 3596" in violation.reference


def test_alignment_defaults_to_nibbles() -> None:
    """Without an alignment argument, 4-bit (nibble) boundaries apply."""
    assert rules(check_alignment(P("2001:db8::/49"))) == ["alignment"]
    assert check_alignment(P("2001:db8::/52")) == []


@pytest.mark.parametrize("alignment_bits", [0, -4], ids=["zero", "negative"])
def test_alignment_below_one_bit_is_refused(alignment_bits: int) -> None:
    """An alignment of less than one bit is a policy error of kind INVALID."""
    with pytest.raises(PolicyViolationError, match="at least 1") as info:
        check_alignment(P("2001:db8::/48"), alignment_bits)
    assert info.value.kind is ErrorKind.INVALID


# -- check_special_purpose ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry_index",
    range(len(SPECIAL_PURPOSE_RANGES)),
    ids=[str(e.prefix) for e in SPECIAL_PURPOSE_RANGES],
)
def test_every_special_range_is_refused_as_itself(entry_index: int) -> None:
    """Each registry entry, given as the prefix itself, is refused citing that entry."""
    entry = SPECIAL_PURPOSE_RANGES[entry_index]
    violations = check_special_purpose(entry.prefix)
    hits = [v for v in violations if f"{entry.prefix} {entry.name}" in v.reference]
    assert len(hits) == 1
    assert hits[0].rule == "special-purpose"
    assert hits[0].message.startswith(f"{entry.prefix} is {entry.prefix} ({entry.name}, ")
    assert entry.rfc in hits[0].reference


SPECIAL = [
    # (prefix, allow documentation, expected overlapping registry prefixes)
    # documentation: inside, equal, containing, and adjacent, for both families
    ("2001:db8:1::/48", False, ["2001:db8::/32"]),
    ("192.0.2.0/25", False, ["192.0.2.0/24"]),
    ("2001:db8:1::/48", True, []),
    ("192.0.2.0/25", True, []),
    ("2001:db8::/32", True, []),
    ("198.51.100.0/24", True, []),
    ("3fff:1::/32", False, ["3fff::/20"]),
    ("3fff:1::/32", True, []),
    ("203.0.113.0/24", False, ["203.0.113.0/24"]),
    ("2001:db9::/32", False, []),
    ("192.0.3.0/24", False, []),
    # 2001:db8::/32 is not inside 2001::/23; 2001::/16 contains both
    ("2001:db8::/32", False, ["2001:db8::/32"]),
    ("2001::/16", False, ["2001::/23", "2001:db8::/32"]),
    ("2001::/16", True, ["2001::/23"]),
    ("2001:1::/32", False, ["2001::/23"]),
    ("2001:200::/23", False, []),
    ("2000::/3", True, ["2001::/23", "2002::/16"]),
    ("2000::/3", False, ["2001::/23", "2001:db8::/32", "3fff::/20", "2002::/16"]),
    # the rest of the table: inside, containing, adjacent
    ("fe80::/64", False, ["fe80::/10"]),
    ("fec0::/48", False, ["fec0::/10"]),
    ("fe80::/9", False, ["fe80::/10", "fec0::/10"]),
    ("fe00::/7", False, ["fe80::/10", "fec0::/10", "ff00::/8"]),
    ("ff02::/16", False, ["ff00::/8"]),
    ("64:ff9b::/96", False, ["64:ff9b::/96"]),
    ("64:ff9b:1::/64", False, ["64:ff9b:1::/48"]),
    ("64:ff9b::/32", False, ["64:ff9b::/96", "64:ff9b:1::/48"]),
    ("100::/48", False, ["100::/64"]),
    ("100:0:0:1::/64", False, []),
    ("::/96", False, ["::/128", "::1/128"]),
    ("::/64", False, ["::/128", "::1/128", "::ffff:0:0/96"]),
    ("2002:c000:204::/48", False, ["2002::/16"]),
    ("127.0.0.0/16", False, ["127.0.0.0/8"]),
    ("126.0.0.0/8", False, []),
    ("128.0.0.0/8", False, []),
    ("0.0.0.0/8", False, ["0.0.0.0/8"]),
    ("169.254.1.0/24", False, ["169.254.0.0/16"]),
    ("192.0.0.0/29", False, ["192.0.0.0/24"]),
    ("192.0.0.0/22", False, ["192.0.0.0/24", "192.0.2.0/24"]),
    ("192.0.0.0/22", True, ["192.0.0.0/24"]),
    ("198.18.0.0/16", False, ["198.18.0.0/15"]),
    ("198.16.0.0/13", False, ["198.18.0.0/15"]),
    ("198.20.0.0/15", False, []),
    ("239.0.0.0/8", False, ["224.0.0.0/4"]),
    ("240.0.0.0/4", False, ["240.0.0.0/4", "255.255.255.255/32"]),
    ("255.255.255.255/32", False, ["240.0.0.0/4", "255.255.255.255/32"]),
    # normal choices
    ("fd12:3456:789a::/48", False, []),
    ("fc00::/7", False, []),
    ("2a01:4f8::/32", False, []),
    ("10.0.0.0/8", False, []),
    ("172.16.0.0/12", False, []),
    ("192.168.0.0/16", False, []),
    ("100.64.0.0/10", False, []),
]


@pytest.mark.parametrize(
    ("prefix", "allow_documentation", "expected"),
    SPECIAL,
    ids=[f"{p}-{'docs' if allow else 'strict'}" for p, allow, _ in SPECIAL],
)
def test_check_special_purpose(prefix: str, allow_documentation: bool, expected: list[str]) -> None:
    """Every registry entry that overlaps the prefix, in either direction, is reported."""
    violations = check_special_purpose(P(prefix), allow_documentation=allow_documentation)
    assert set(rules(violations)) <= {"special-purpose"}
    reported = [v.reference.split(": ", 1)[1].split(" ", 1)[0] for v in violations]
    assert reported == expected


@pytest.mark.parametrize(
    ("prefix", "relation"),
    [
        ("2001:db8::/32", "2001:db8::/32 is 2001:db8::/32 "),
        ("2001:db8:1::/48", "2001:db8:1::/48 is inside 2001:db8::/32 "),
        ("2001:d00::/24", "2001:d00::/24 contains 2001:db8::/32 "),
        ("192.0.2.0/24", "192.0.2.0/24 is 192.0.2.0/24 "),
        ("192.0.2.64/26", "192.0.2.64/26 is inside 192.0.2.0/24 "),
        ("192.0.0.0/23", "192.0.0.0/23 contains 192.0.0.0/24 "),
    ],
    ids=["v6-equal", "v6-inside", "v6-contains", "v4-equal", "v4-inside", "v4-contains"],
)
def test_special_purpose_message_says_how_they_overlap(prefix: str, relation: str) -> None:
    """The message says whether the prefix is, is inside, or contains the special range."""
    (violation, *_) = check_special_purpose(P(prefix))
    assert violation.message.startswith(relation)


def test_special_purpose_advice_depends_on_family_and_kind() -> None:
    """IPv6 advice points to GUA or random ULA, IPv4 to RFC 1918; documentation names the flag."""
    (v6,) = check_special_purpose(P("2001:db8::/48"))
    assert "ULA /48 with a random Global ID" in v6.message
    assert "allow_documentation" in v6.message
    (v4,) = check_special_purpose(P("127.0.0.0/8"))
    assert "RFC 1918" in v4.message
    assert "allow_documentation" not in v4.message


def test_whole_address_spaces_overlap_every_entry_of_their_family() -> None:
    """::/0 and 0.0.0.0/0 hit every registry entry of their family."""
    for text, version in (("::/0", 6), ("0.0.0.0/0", 4)):
        entries = [e for e in SPECIAL_PURPOSE_RANGES if e.prefix.version == version]
        assert len(check_special_purpose(P(text))) == len(entries)
        kept = [e for e in entries if not e.documentation]
        assert len(check_special_purpose(P(text), allow_documentation=True)) == len(kept)


def test_ipv4_mapped_range_is_refused_when_built_from_integers() -> None:
    """The IPv4-mapped range, which the parser refuses, is also refused here."""
    mapped = Prefix.of(6, 0xFFFF << 32, 100)
    (violation,) = check_special_purpose(mapped)
    assert "::ffff:0:0/96" in violation.message


ULA = [
    # (prefix, expected rule ids)
    ("fd00::/48", ["ula-global-id-zero"]),
    ("fd00::/104", ["ula-global-id-zero"]),
    ("fd00:0:0:1::/64", ["ula-global-id-zero"]),
    ("fd00::/8", []),
    ("fd00:0:1::/48", []),
    ("fcff:ffff:ffff::/48", []),
    ("fd12:3456:789a::/48", []),
]


@pytest.mark.parametrize(("prefix", "expected"), ULA, ids=[p for p, _ in ULA])
def test_ula_global_id_zero(prefix: str, expected: list[str]) -> None:
    """A ULA prefix inside fd00::/48 (Global ID zero) is refused; other ULA space is fine."""
    violations = check_special_purpose(P(prefix), allow_documentation=True)
    assert rules(violations) == expected


def test_ula_global_id_zero_message_explains_cilium_default() -> None:
    """The message cites RFC 4193, Cilium's default and what a proper /48 looks like."""
    (violation,) = check_special_purpose(P("fd00::/104"))
    assert violation.message.startswith("fd00::/104 is inside fd00::/48")
    assert "RFC 4193 section 3.2.2" in violation.message
    assert "fd00::/104" in violation.reference
    assert "random" in violation.message


# -- check_disjoint -------------------------------------------------------------------------------

DISJOINT = [
    # (roles, expected messages' start)
    ({"pod": ["2001:db8:1::/48"], "service": ["2001:db8:2::/112"]}, []),
    ({"pod": ["10.1.0.0/16"], "service": ["10.2.0.0/16"]}, []),
    (
        {"pod": ["2001:db8::/48"], "service": ["2001:db8::/112"]},
        ["pod prefix 2001:db8::/48 contains service prefix 2001:db8::/112"],
    ),
    (
        {"pod": ["10.0.0.0/16"], "service": ["10.0.1.0/24"]},
        ["pod prefix 10.0.0.0/16 contains service prefix 10.0.1.0/24"],
    ),
    (
        {"service": ["2001:db8::/112"], "pod": ["2001:db8::/48"]},
        ["service prefix 2001:db8::/112 is inside pod prefix 2001:db8::/48"],
    ),
    (
        {"ingress": ["192.0.2.0/28"], "egress": ["192.0.2.0/28"]},
        ["ingress prefix 192.0.2.0/28 is egress prefix 192.0.2.0/28"],
    ),
    ({"pod": ["2001:db8::/48", "2001:db8::/56"]}, []),
    ({"pod": ["10.0.0.0/8"], "service": ["2001:db8::/112"]}, []),
    (
        {"node": ["2001:db8::/64"], "pod": ["2001:db8::/64"], "egress": ["2001:db8::/64"]},
        [
            "node prefix 2001:db8::/64 is pod prefix",
            "node prefix 2001:db8::/64 is egress prefix",
            "pod prefix 2001:db8::/64 is egress prefix",
        ],
    ),
    (
        {"pod": ["10.0.0.0/16", "2001:db8::/48"], "lb": ["10.0.0.0/24", "2001:db8:0:1::/64"]},
        [
            "pod prefix 10.0.0.0/16 contains lb prefix 10.0.0.0/24",
            "pod prefix 2001:db8::/48 contains lb prefix 2001:db8:0:1::/64",
        ],
    ),
]


@pytest.mark.parametrize(
    ("roles", "expected"),
    DISJOINT,
    ids=[
        "v6-disjoint",
        "v4-disjoint",
        "v6-contains",
        "v4-contains",
        "inside",
        "equal",
        "same-role-ignored",
        "families-never-overlap",
        "three-roles-three-pairs",
        "dual-stack-pairs",
    ],
)
def test_check_disjoint(roles: dict[str, list[str]], expected: list[str]) -> None:
    """Each overlapping pair of prefixes from different roles is reported once."""
    violations = check_disjoint({role: [P(p) for p in ps] for role, ps in roles.items()})
    assert set(rules(violations)) <= {"role-overlap"}
    assert len(violations) == len(expected)
    for violation, start in zip(violations, expected, strict=True):
        assert violation.message.startswith(start)
        assert "must not share addresses" in violation.message


# -- check_cluster --------------------------------------------------------------------------------

V6_ROLES = {
    "node": ["2001:db8:4::/64"],
    "pod": ["2001:db8:4:100::/56"],
    "service": ["2001:db8:4:1::/112"],
    "ingress": ["2001:db8:4:2::/120"],
    "egress": ["2001:db8:4:3::/120"],
}
V4_ROLES = {
    "node": ["10.20.0.0/24"],
    "pod": ["10.20.128.0/17"],
    "service": ["10.20.64.0/20"],
    "ingress": ["10.20.1.0/26"],
    "egress": ["10.20.2.0/28"],
}


def plan(
    blocks: list[str] | None = None,
    roles: dict[str, list[str]] | None = None,
    *,
    node_lengths: dict[int, int] | None = None,
    alignment_bits: int = 4,
    allow_documentation: bool = True,
    legacy_allocator: bool = True,
) -> ClusterPlan:
    """A ClusterPlan from text, defaulting to a clean IPv6-only documentation plan."""
    roles = V6_ROLES if roles is None else roles
    return ClusterPlan(
        blocks=[P(b) for b in (blocks or ["2001:db8:4::/48"])],
        roles={role: [P(p) for p in ps] for role, ps in roles.items()},
        node_lengths=dict(DEFAULT_NODE_LENGTHS) if node_lengths is None else node_lengths,
        alignment_bits=alignment_bits,
        allow_documentation=allow_documentation,
        legacy_allocator=legacy_allocator,
    )


def test_clean_ipv6_plan_has_no_violations() -> None:
    """A /48 block with /64 nodes, a /56 pod prefix and a /112 service range is fine."""
    assert check_cluster(plan()) == []


def test_clean_dual_stack_plan_has_no_violations() -> None:
    """A dual-stack plan with one block and one prefix per family per role is fine."""
    roles = {role: V6_ROLES[role] + V4_ROLES[role] for role in V6_ROLES}
    assert check_cluster(plan(["2001:db8:4::/48", "10.20.0.0/16"], roles)) == []


def test_plan_defaults() -> None:
    """A plan defaults to the Kubernetes node masks, nibbles, strict ranges and legacy limits."""
    bare = ClusterPlan(blocks=[], roles={})
    assert bare.node_lengths == {4: 24, 6: 64} == DEFAULT_NODE_LENGTHS
    assert bare.alignment_bits == 4
    assert bare.allow_documentation is False
    assert bare.legacy_allocator is True
    assert check_cluster(bare) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        bare.alignment_bits = 1  # type: ignore[misc]


def test_documentation_ranges_are_refused_in_every_prefix_without_the_flag() -> None:
    """Without allow_documentation the block and every role prefix are refused."""
    violations = check_cluster(plan(allow_documentation=False))
    assert rules(violations) == ["special-purpose"] * 6


def test_blocks_are_checked_for_family_count_special_purpose_and_alignment() -> None:
    """Two IPv6 blocks, a special-purpose block and an unaligned block are all reported."""
    violations = check_cluster(plan(["2001:db8:4::/48", "fe80::/50"], {}))
    assert rules(violations) == ["family-count-per-family", "special-purpose", "alignment"]
    assert violations[0].message.startswith("2 IPv6 prefixes are given for the cluster block")
    assert violations[2].message.startswith("cluster block fe80::/50 does not end")


@pytest.mark.parametrize(
    ("blocks", "roles", "start"),
    [
        (
            ["2001:db8:4::/48"],
            {"service": ["2001:db8:5::/112"]},
            "service prefix 2001:db8:5::/112 is not inside the cluster block 2001:db8:4::/48",
        ),
        (
            ["10.20.0.0/16"],
            {"service": ["10.21.0.0/20"]},
            "service prefix 10.21.0.0/20 is not inside the cluster block 10.20.0.0/16",
        ),
        (
            ["2001:db8:4::/48"],
            {"ingress": ["10.20.1.0/26"]},
            "ingress prefix 10.20.1.0/26 is IPv4 but the cluster has no IPv4 block",
        ),
        (
            ["10.20.0.0/16"],
            {"ingress": ["2001:db8:4:2::/120"]},
            "ingress prefix 2001:db8:4:2::/120 is IPv6 but the cluster has no IPv6 block",
        ),
    ],
    ids=["v6-outside", "v4-outside", "v4-without-block", "v6-without-block"],
)
def test_role_prefixes_must_lie_inside_a_block(
    blocks: list[str], roles: dict[str, list[str]], start: str
) -> None:
    """A role prefix outside every block of its family is refused."""
    (violation,) = check_cluster(plan(blocks, roles))
    assert violation.rule == "role-outside-block"
    assert violation.message.startswith(start)


def test_role_lists_are_checked_for_family_count() -> None:
    """A role listing one prefix twice is reported as a duplicate for that role."""
    roles = {"ingress": ["2001:db8:4:2::/120", "2001:db8:4:2::/120"]}
    violations = check_cluster(plan(roles=roles))
    assert rules(violations) == ["family-duplicate"]
    assert "for the ingress role" in violations[0].message


@pytest.mark.parametrize(
    ("service", "legacy", "expected"),
    [
        ("2001:db8:4:1::/64", True, ["service-range-too-large"]),
        ("2001:db8:4:1::/64", False, []),
        ("2001:db8:4:1::/128", True, ["service-range-too-small"]),
        ("10.0.0.0/8", True, ["role-outside-block", "service-range-too-large"]),
    ],
    ids=["v6-too-large", "v6-new-allocator", "v6-too-small", "v4-too-large"],
)
def test_service_role_gets_the_service_range_rules(
    service: str, legacy: bool, expected: list[str]
) -> None:
    """The service role is checked as a service range, honouring legacy_allocator."""
    blocks = ["2001:db8:4::/48", "10.20.0.0/16"]
    violations = check_cluster(plan(blocks, {"service": [service]}, legacy_allocator=legacy))
    assert rules(violations) == expected


@pytest.mark.parametrize(
    ("pod", "node_lengths", "expected"),
    [
        ("2001:db8:4:100::/56", {6: 64}, []),
        ("2001:db8:4::/48", {6: 64}, []),
        ("2001:db8:4::/48", {6: 80}, ["node-mask-diff"]),
        ("2001:db8:4::/64", {6: 56}, ["node-mask-shorter-than-cluster"]),
        ("2001:db8:4:100::/56", {6: 129}, ["node-mask-too-long"]),
        ("2001:db8:4:100::/56", {6: 66}, ["alignment"]),
        ("10.20.128.0/17", {4: 24}, []),
        ("10.20.128.0/17", {}, []),
        ("10.20.128.0/26", {}, ["node-mask-shorter-than-cluster"]),
        ("10.20.128.0/17", {4: 26}, []),
        ("10.20.0.0/16", {4: 33}, ["node-mask-too-long"]),
    ],
    ids=[
        "v6-ok",
        "v6-diff-16",
        "v6-diff-32",
        "v6-shorter",
        "v6-too-long-not-aligned-twice",
        "v6-node-mask-unaligned",
        "v4-ok",
        "v4-default-24",
        "v4-default-shorter",
        "v4-not-aligned",
        "v4-too-long",
    ],
)
def test_pod_role_gets_the_node_mask_rules(
    pod: str, node_lengths: dict[int, int], expected: list[str]
) -> None:
    """The pod prefix must hold the per-node mask of its family, aligned for IPv6."""
    blocks = ["2001:db8:4::/48", "10.20.0.0/16"]
    violations = check_cluster(plan(blocks, {"pod": [pod]}, node_lengths=node_lengths))
    assert rules(violations) == expected


def test_node_mask_alignment_message_names_mask_and_pod_prefix() -> None:
    """An unaligned IPv6 node mask is reported with its pod prefix and aligned choices."""
    violations = check_cluster(plan(roles={"pod": ["2001:db8:4::/48"]}, node_lengths={6: 62}))
    (violation,) = violations
    assert violation.message.startswith("node mask /62 (pod prefix 2001:db8:4::/48) does not")
    assert violation.message.endswith("use /60 or /64.")


def test_alignment_applies_to_ipv6_prefixes_only() -> None:
    """An unaligned IPv6 role prefix is refused; an unaligned IPv4 one is not."""
    roles = {"ingress": ["2001:db8:4:2::/121", "10.20.1.0/26"]}
    violations = check_cluster(plan(["2001:db8:4::/48", "10.20.0.0/16"], roles))
    assert rules(violations) == ["alignment"]
    assert violations[0].message.startswith("ingress prefix 2001:db8:4:2::/121 does not end")


def test_alignment_of_one_bit_turns_alignment_off() -> None:
    """With alignment_bits=1 any IPv6 length passes."""
    roles = {"pod": ["2001:db8:4::/49"], "ingress": ["2001:db8:4:8000::/121"]}
    assert check_cluster(plan(roles=roles, node_lengths={6: 63}, alignment_bits=1)) == []


def test_cluster_alignment_below_one_bit_is_refused() -> None:
    """A plan with alignment_bits below 1 is refused before any check runs."""
    with pytest.raises(PolicyViolationError, match="at least 1"):
        check_cluster(plan(alignment_bits=0))


def test_roles_in_a_plan_must_be_disjoint() -> None:
    """Overlapping roles in a plan are reported after the per-prefix checks."""
    roles = {"node": ["2001:db8:4::/64"], "ingress": ["2001:db8:4::/120"]}
    violations = check_cluster(plan(roles=roles))
    assert rules(violations) == ["role-overlap"]
    assert violations[0].message.startswith("node prefix 2001:db8:4::/64 contains ingress")


def test_every_problem_of_a_plan_is_reported_in_order() -> None:
    """A plan with several problems yields all of them, blocks first, overlaps last."""
    roles = {
        "pod": ["2001:db8:4::/48"],
        "service": ["2001:db8:4::/64"],
        "egress": ["fd00::/120"],
    }
    violations = check_cluster(plan(["2001:db8:4::/48", "10.0.0.0/8", "10.1.0.0/16"], roles))
    assert rules(violations) == [
        "family-count-max",
        "family-count-per-family",
        "service-range-too-large",
        "role-outside-block",
        "ula-global-id-zero",
        "role-overlap",
    ]


# -- require --------------------------------------------------------------------------------------


def test_require_passes_when_nothing_is_wrong() -> None:
    """An empty list of violations raises nothing."""
    require([])
    require(check_cluster(plan()))


def test_require_raises_with_every_violation() -> None:
    """A non-empty list raises ClusterCheckError of kind INVALID carrying all violations."""
    violations = check_cluster(plan(allow_documentation=False))
    with pytest.raises(ClusterCheckError) as info:
        require(violations)
    assert info.value.violations == tuple(violations)
    assert len(info.value.violations) == 6
    assert info.value.kind is ErrorKind.INVALID
    assert info.value.message == " ".join(v.message for v in violations)


def test_every_violation_is_a_full_sentence_with_a_reference() -> None:
    """Messages are sentences ending in a full stop; references and rule ids are non-empty."""
    violations = check_cluster(
        plan(
            ["2001:db8:4::/48", "fe80::/50", "10.0.0.0/8"],
            {
                "pod": ["2001:db8:4::/48", "2001:db8:4::/48"],
                "service": ["2001:db8:4::/125", "192.0.0.0/8"],
                "egress": ["fd00::/120"],
            },
            node_lengths={6: 80},
            allow_documentation=False,
        )
    )
    assert len({v.rule for v in violations}) >= 8
    for violation in violations:
        assert violation.message[0].isalnum()
        assert violation.message.endswith(".")
        assert violation.reference
        assert violation.rule == violation.rule.lower()
        assert " " not in violation.rule
