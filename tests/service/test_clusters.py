"""Cluster templates, settings and layouts without a database (service/clusters.py)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import parse_prefix
from service.clusters import (
    BUILTIN_TEMPLATES,
    CLUSTER_ROLES,
    ClusterSettings,
    EgressIdentity,
    check,
    check_cluster_name,
    layout,
    node_key,
    resolve,
)
from service.errors import InvalidRequestError

BLOCK = parse_prefix("fd3c:9e12:7a00::/48")


def test_every_builtin_template_lays_out_and_passes_every_rule() -> None:
    """The built-in templates are plannable as they are, in their families."""
    for template in BUILTIN_TEMPLATES.values():
        settings = template.settings
        blocks = [BLOCK] + ([parse_prefix("10.0.0.0/16")] if settings.dual_stack else [])
        roles: dict[str, list[object]] = {r: [] for r in CLUSTER_ROLES}
        for block in blocks:
            for role, prefix in layout(block, settings).items():
                roles[role].append(prefix)
        assert check(blocks, roles, settings) == [], template.name  # type: ignore[arg-type]


def test_layout_is_deterministic_disjoint_and_inside_the_block() -> None:
    """Largest role first from the block's start; the same input, the same answer."""
    roles = layout(BLOCK, ClusterSettings())
    assert roles == layout(BLOCK, ClusterSettings())
    assert list(roles) == list(CLUSTER_ROLES)
    assert str(roles["pod"]) == "fd3c:9e12:7a00::/52"
    assert str(roles["node"]) == "fd3c:9e12:7a00:1000::/64"
    prefixes = list(roles.values())
    assert all(BLOCK.contains(p) for p in prefixes)
    assert not any(a.overlaps(b) for i, a in enumerate(prefixes) for b in prefixes[i + 1 :])


def test_layout_says_what_to_change_when_roles_do_not_fit() -> None:
    """A block too small for its roles: the numbers and the setting to change."""
    with pytest.raises(InvalidRequestError, match="do not fit") as caught:
        layout(BLOCK, ClusterSettings(pod_prefix_length=48))
    assert caught.value.field == "overrides.block_prefix_length"
    with pytest.raises(InvalidRequestError, match="shorter than the cluster block") as caught:
        layout(BLOCK, ClusterSettings(service_prefix_length=40))
    assert caught.value.field == "overrides.service_prefix_length"


def test_the_16_bit_rule_follows_who_slices_the_pod_prefix() -> None:
    """Kipam's node IPAM takes /80 from /56; the Cilium operator and KCM may not."""
    dense = BUILTIN_TEMPLATES["ipv6-dense"].settings
    roles = {r: [p] for r, p in layout(BLOCK, dense).items()}
    assert check([BLOCK], roles, dense) == []
    for slicer in ({"ipam_mode": "cluster-pool"}, {"node_ipam": "kube-controller-manager"}):
        settings = resolve(dense, slicer)
        assert [v.rule for v in check([BLOCK], roles, settings)] == ["node-mask-diff"]
        assert settings.allocate_node_cidrs == ("node_ipam" in slicer)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"colour": "blue"}, "overrides.colour", "not a cluster setting"),
        ({"node_prefix_length": "sixty-four"}, "overrides.node_prefix_length", "whole number"),
        ({"node_prefix_length": "129"}, "overrides.node_prefix_length", "0 to 128"),
        ({"ipv4_pod_prefix_length": "33"}, "overrides.ipv4_pod_prefix_length", "0 to 32"),
        ({"family": "ipv5"}, "overrides.family", "ipv6, dual-stack"),
        ({"routing_mode": "bgp"}, "overrides.routing_mode", "native, tunnel"),
        ({"legacy_service_allocator": "maybe"}, "overrides.legacy_service_allocator", "true"),
        ({"dns_domain": "Cluster_Local"}, "overrides.dns_domain", "DNS-1123"),
        ({"egress_gateway_labels": "no-equals"}, "overrides.egress_gateway_labels", "key=value"),
        ({"node_quarantine_seconds": "-1"}, "overrides.node_quarantine_seconds", "ten years"),
    ],
)
def test_bad_overrides_name_the_setting(overrides: dict[str, str], field: str, words: str) -> None:
    """Each bad override is refused with its field and what would be accepted."""
    with pytest.raises(InvalidRequestError, match=words) as caught:
        resolve(ClusterSettings(), overrides)
    assert caught.value.field == field


def test_overrides_accept_the_usual_spellings() -> None:
    """/64 or 64, true/yes/on; every setting survives its text form."""
    settings = resolve(
        ClusterSettings(),
        {"node_prefix_length": "/60", "auto_direct_node_routes": "no", "family": "dual-stack"},
    )
    assert (settings.node_prefix_length, settings.auto_direct_node_routes) == (60, False)
    assert resolve(ClusterSettings(), settings.to_text()) == settings
    assert ClusterSettings.from_json({**settings.to_json(), "retired": 1}) == settings


@given(st.sampled_from([f.name for f in dataclasses.fields(ClusterSettings)]))
def test_every_setting_round_trips_through_text(name: str) -> None:
    """What to_text writes, resolve reads back, for every template."""
    for template in BUILTIN_TEMPLATES.values():
        text = template.settings.to_text()
        assert resolve(ClusterSettings(), {name: text[name]}).to_json()[name] == getattr(
            template.settings, name
        )


def test_names_and_keys() -> None:
    """Cluster names are DNS labels; owner keys are short, stable and per sequence."""
    assert check_cluster_name("eu1-prod") == "eu1-prod"
    for bad in ("", "EU1", "eu1/prod", "-eu1", "a" * 64, 7):
        with pytest.raises(InvalidRequestError):
            check_cluster_name(bad)
    key = node_key("node/" + "w" * 253, 0)
    assert len(key) < 64
    assert key == node_key("node/" + "w" * 253, 0)
    assert key != node_key("node/" + "w" * 253, 1)
    identity = EgressIdentity("tenant-a", {"tier": "web", "app": "shop"})
    assert identity.owner == "egress/tenant-a/app=shop,tier=web"
    assert identity.allocation_labels()["io.kubernetes.pod.namespace"] == "tenant-a"
