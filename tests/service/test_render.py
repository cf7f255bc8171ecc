"""service/render.py: golden files for every target of four clusters, checked against upstream.

The golden files live in ``tests/service/golden/render/<case>-<target>.yaml`` and are compared
byte for byte. After a deliberate change, rewrite them with ``KIPAM_UPDATE_GOLDEN=1`` and read
the diff. Upstream validation is in ``tests/service/upstream.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from engine import parse_address, parse_prefix
from service.clusters import Cluster, ClusterSettings, EgressIdentity, layout
from service.errors import InvalidRequestError
from service.models import Pool, PoolPolicy
from service.render import TARGETS, render
from tests.service import upstream

if TYPE_CHECKING:
    from engine import Prefix
    from service.models import Role

GOLDEN = Path(__file__).resolve().parent / "golden" / "render"
UPDATE = os.environ.get("KIPAM_UPDATE_GOLDEN") == "1"
CREATED = datetime(2026, 1, 1, tzinfo=UTC)

# What the pinned upstream files hash to (tests/data/upstream/README.md): an edit shows here.
UPSTREAM_SHA256 = {
    "cilium-main-0079af0/install/kubernetes/cilium/values.yaml": (
        "42b3bf8a7b00f3122d9b7423a3f642edded2cf6dc4371f97435c9fd86c4bd3c6"
    ),
    "cilium-main-0079af0/install/kubernetes/cilium/values.schema.json": (
        "a8c844c75830059997aa3702238855b67f837a6c97badb890f9b57b7cdf2f68a"
    ),
    "cilium-5575315/pkg/k8s/apis/cilium.io/client/crds/v2/ciliumloadbalancerippools.yaml": (
        "b9ff23770b3319b7b2fcf84675f8174786870c9e0a1a445567acc2b373654759"
    ),
    "cilium-076bbeb/pkg/k8s/apis/cilium.io/client/crds/v2/ciliumegressgatewaypolicies.yaml": (
        "f9c93432210af4a85ff5920b2f94590768391ffa93452af2347b6f6ee9c86e18"
    ),
}


# -- clusters, built directly (no database) -----------------------------------------------------


def _pool(index: int, name: str, cidr: Prefix, role: Role, parent: str) -> Pool:
    return Pool(
        id=index,
        name=name,
        cidr=cidr,
        space="default",
        role=role,
        parent=parent,
        policy=PoolPolicy(allow_documentation=True),
        labels={},
        generation=1,
        revision=index,
        created_at=CREATED,
    )


def plan(
    name: str, settings: ClusterSettings, block: str, block4: str | None = None, revision: int = 1
) -> Cluster:
    """A cluster laid out by the engine, as the service would store it."""
    six = parse_prefix(block)
    pools = {
        role: _pool(i, f"{name}/{role}", prefix, role, name)
        for i, (role, prefix) in enumerate(layout(six, settings).items(), start=2)
    }
    ipv4_block = ipv4_pools = None
    if block4 is not None:
        four = parse_prefix(block4)
        ipv4_block = _pool(20, f"{name}/ipv4", four, "container", "site4")
        ipv4_pools = {
            role: _pool(i, f"{name}/ipv4/{role}", prefix, role, f"{name}/ipv4")
            for i, (role, prefix) in enumerate(layout(four, settings).items(), start=21)
        }
    return Cluster(
        name=name,
        template="custom",
        settings=settings,
        block=_pool(1, name, six, "container", "site"),
        pools=pools,
        parent="site",
        ipv4_block=ipv4_block,
        ipv4_pools=ipv4_pools or {},
        ipv4_parent="site4" if block4 else None,
        revision=revision,
        created_at=CREATED,
    )


def nth(cluster: Cluster, version: int, n: int) -> Prefix:
    """The n-th address of the cluster's egress pool of one family."""
    pool = cluster.pools["egress"] if version == 6 else cluster.ipv4_pools["egress"]
    return parse_address(str(pool.cidr.to_network().network_address + n))


CASES = {
    # IPv6-only, Cilium ipam.mode=kubernetes, kipam writes Node.spec.podCIDRs.
    "ipv6": plan("eu1-prod", ClusterSettings(), "fd3c:9e12:1::/48", revision=7),
    # IPv6-only, the Cilium operator slices the pod prefix.
    "ipv6-cluster-pool": plan(
        "eu1-pool", ClusterSettings(ipam_mode="cluster-pool"), "fd3c:9e12:2::/48"
    ),
    # Dual-stack, kube-controller-manager slices (so its mask-size flags appear).
    "dual-stack": plan(
        "eu1-dual",
        ClusterSettings(
            family="dual-stack", node_ipam="kube-controller-manager", egress_gateway=True
        ),
        "fd3c:9e12:3::/48",
        "10.20.0.0/16",
        revision=2,
    ),
    # IPv6-only overlay: no native-routing CIDR; masquerading on; two gateway labels.
    "tunnel": plan(
        "lab-tunnel",
        ClusterSettings(
            routing_mode="tunnel",
            ipv6_masquerade=True,
            dns_domain="lab.example",
            egress_gateway_labels="topology.kubernetes.io/zone=a,kipam.io/egress-gateway=true",
            egress_gateway=True,
        ),
        "fd3c:9e12:4::/48",
    ),
}

BILLING = EgressIdentity("billing", {"app": "billing"})
CHECKOUT = EgressIdentity("payments", {"tier": "web", "app": "checkout"})
WEB = EgressIdentity("tenant-a", {"app": "web"})

EGRESS: dict[str, list[tuple[EgressIdentity, Prefix]]] = {
    "ipv6": [(CHECKOUT, nth(CASES["ipv6"], 6, 1)), (BILLING, nth(CASES["ipv6"], 6, 2))],
    "ipv6-cluster-pool": [(BILLING, nth(CASES["ipv6-cluster-pool"], 6, 1))],
    "dual-stack": [
        (WEB, nth(CASES["dual-stack"], 6, 3)),
        (BILLING, nth(CASES["dual-stack"], 4, 1)),
        (BILLING, nth(CASES["dual-stack"], 6, 1)),
    ],
    "tunnel": [],
}


def vip(cluster: Cluster, version: int, n: int) -> Prefix:
    """The n-th address of the cluster's ingress pool of one family."""
    pool = cluster.pools["ingress"] if version == 6 else cluster.ipv4_pools["ingress"]
    return parse_address(str(pool.cidr.to_network().network_address + n))


VIPS: dict[str, list[tuple[str, str, Prefix]]] = {
    "ipv6": [
        ("ingress-nginx", "controller", vip(CASES["ipv6"], 6, 1)),
        ("default", "api", vip(CASES["ipv6"], 6, 2)),
    ],
    "ipv6-cluster-pool": [],
    "dual-stack": [
        ("default", "web", vip(CASES["dual-stack"], 4, 1)),
        ("default", "web", vip(CASES["dual-stack"], 6, 1)),
    ],
    "tunnel": [("default", "web", vip(CASES["tunnel"], 6, 1))],
}

PAIRS = [(case, target) for case in CASES for target in TARGETS]
IDS = [f"{case}-{target}" for case, target in PAIRS]


def rendered(case: str, target: str) -> str:
    """One case's target, with the case's egress allocations and Service VIPs."""
    return render(CASES[case], target, egress=EGRESS[case], vips=VIPS[case])


def documents(text: str) -> list[Any]:
    """The YAML documents of a rendered text (the header comment alone gives none)."""
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


# -- golden files and upstream validity ---------------------------------------------------------


@pytest.mark.parametrize(("case", "target"), PAIRS, ids=IDS)
def test_golden(case: str, target: str) -> None:
    """Every target of every case renders to its golden file, byte for byte."""
    text = rendered(case, target)
    golden = GOLDEN / f"{case}-{target}.yaml"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(text.encode())
    assert golden.read_bytes() == text.encode()


@pytest.mark.parametrize(("case", "target"), PAIRS, ids=IDS)
def test_valid_upstream(case: str, target: str) -> None:
    """Every rendered document passes the pinned upstream schema or structural check."""
    upstream.validate_rendered(target, documents(rendered(case, target)))


def test_golden_files_are_exactly_the_cases() -> None:
    """No golden file is left over from a case or target that no longer exists."""
    assert sorted(p.name for p in GOLDEN.glob("*.yaml")) == sorted(f"{i}.yaml" for i in IDS)


def test_pinned_upstream_files_are_unchanged() -> None:
    """The upstream test data still hashes to what the README records."""
    actual = {
        name: hashlib.sha256((upstream.DATA / name).read_bytes()).hexdigest()
        for name in UPSTREAM_SHA256
    }
    assert actual == UPSTREAM_SHA256


def test_pinned_chart_files_agree() -> None:
    """The pinned values.schema.json describes exactly the keys of the pinned values.yaml."""

    def paths(node: Any, prefix: str = "") -> set[str]:
        if not isinstance(node, dict):
            return set()
        return {f"{prefix}{k}" for k in node} | {
            p for k, v in node.items() for p in paths(v, f"{prefix}{k}.")
        }

    def schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
        props = schema.get("properties", {})
        return {f"{prefix}{k}" for k in props} | {
            p for k, v in props.items() for p in schema_paths(v, f"{prefix}{k}.")
        }

    values = upstream.chart_values()
    described = schema_paths(upstream.values_schema())
    # `global` is Helm's own; the schema describes it, values.yaml does not set it.
    assert described - paths(values) == {"global"}
    assert not {p for p in paths(values) if p.count(".") < 2} - described


# -- the shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_header_names_cluster_and_revision(target: str) -> None:
    """The first line says which cluster and revision the text was rendered from."""
    first = rendered("ipv6", target).splitlines()[0]
    assert first == (
        "# Rendered by kipam for cluster eu1-prod (revision 7); do not edit, re-render."
    )


@pytest.mark.parametrize(("case", "target"), PAIRS, ids=IDS)
def test_cidrs_are_quoted(case: str, target: str) -> None:
    """Every CIDR or address in the text stands inside double quotes."""
    token = re.compile(r"[0-9A-Fa-f:.]*[:.][0-9A-Fa-f:.]*(/\d+)?")
    for line in rendered(case, target).splitlines()[1:]:
        for match in token.finditer(line):
            text = match.group()
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                continue
            assert '"' in line[: match.start()], line


def test_dual_stack_lists_put_ipv6_first() -> None:
    """Dual-stack subnets, flags and CIDR lists name the IPv6 prefix first."""
    cluster = CASES["dual-stack"]
    pod6, pod4 = (str(p) for p in cluster.prefixes("pod"))
    svc6, svc4 = (str(p) for p in cluster.prefixes("service"))
    kubeadm = documents(rendered("dual-stack", "kubeadm"))[0]
    assert kubeadm["networking"]["podSubnet"] == f"{pod6},{pod4}"
    assert kubeadm["networking"]["serviceSubnet"] == f"{svc6},{svc4}"
    flags = documents(rendered("dual-stack", "kcm-flags"))[0]
    assert f"--cluster-cidr={pod6},{pod4}" in flags
    assert documents(rendered("dual-stack", "service-cidr"))[0]["spec"]["cidrs"] == [svc6, svc4]
    values = documents(rendered("dual-stack", "cilium-values"))[0]
    assert (values["ipv6NativeRoutingCIDR"], values["ipv4NativeRoutingCIDR"]) == (pod6, pod4)


def test_kube_controller_manager_slicing_adds_mask_sizes() -> None:
    """When kube-controller-manager allocates node CIDRs, its mask sizes come with it."""
    kubeadm = documents(rendered("dual-stack", "kubeadm"))[0]
    assert kubeadm["controllerManager"]["extraArgs"] == [
        {"name": "allocate-node-cidrs", "value": "true"},
        {"name": "node-cidr-mask-size-ipv6", "value": "64"},
        {"name": "node-cidr-mask-size-ipv4", "value": "24"},
    ]
    ipv6 = documents(rendered("ipv6", "kubeadm"))[0]
    assert ipv6["controllerManager"]["extraArgs"] == [
        {"name": "allocate-node-cidrs", "value": "false"}
    ]
    assert documents(rendered("ipv6", "kcm-flags"))[0][0] == "--allocate-node-cidrs=false"


def test_cilium_values_follow_the_ipam_mode() -> None:
    """cluster-pool gets the operator's pod CIDR list; kubernetes mode waits for podCIDRs."""
    pool = documents(rendered("ipv6-cluster-pool", "cilium-values"))[0]
    pod = str(CASES["ipv6-cluster-pool"].prefixes("pod")[0])
    assert pool["ipam"] == {
        "mode": "cluster-pool",
        "operator": {"clusterPoolIPv6PodCIDRList": [pod], "clusterPoolIPv6MaskSize": 64},
    }
    assert "k8s" not in pool
    kubernetes = documents(rendered("ipv6", "cilium-values"))[0]
    assert kubernetes["ipam"] == {"mode": "kubernetes"}
    assert kubernetes["k8s"] == {"requireIPv6PodCIDR": True}
    tunnel = documents(rendered("tunnel", "cilium-values"))[0]
    assert tunnel["routingMode"] == "tunnel"
    assert "ipv6NativeRoutingCIDR" not in tunnel
    assert "autoDirectNodeRoutes" not in tunnel


def test_egress_policy_matches_address_family() -> None:
    """An IPv4 egress address gets an IPv4 default route and a name of its own."""
    policies = documents(rendered("dual-stack", "egress-policy"))
    by_ip = {p["spec"]["egressGateway"]["egressIP"]: p for p in policies}
    v6 = by_ip[nth(CASES["dual-stack"], 6, 1).address]
    v4 = by_ip[nth(CASES["dual-stack"], 4, 1).address]
    assert v6["spec"]["destinationCIDRs"] == ["::/0"]
    assert v4["spec"]["destinationCIDRs"] == ["0.0.0.0/0"]
    assert v4["metadata"]["name"] == v6["metadata"]["name"] + "-ipv4"
    assert v6["spec"]["selectors"] == [
        {
            "podSelector": {
                "matchLabels": {"app": "billing", "io.kubernetes.pod.namespace": "billing"}
            }
        }
    ]
    # Sorted by owner (egress/billing/... before egress/tenant-a/...), IPv6 first.
    owners = [p["metadata"]["annotations"]["kipam.io/owner"] for p in policies]
    assert owners == [BILLING.owner, BILLING.owner, WEB.owner]
    assert [p["spec"]["destinationCIDRs"][0] for p in policies] == ["::/0", "0.0.0.0/0", "::/0"]


def test_no_egress_renders_the_header_alone() -> None:
    """Without egress allocations there is nothing to apply: the header comment only."""
    text = rendered("tunnel", "egress-policy")
    assert text == (
        "# Rendered by kipam for cluster lab-tunnel (revision 1); do not edit, re-render.\n"
    )
    assert documents(text) == []


# -- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "target"), PAIRS, ids=IDS)
def test_rendering_twice_gives_the_same_text(case: str, target: str) -> None:
    """Rendering is a function of its input: the same call twice, the same text."""
    assert rendered(case, target) == rendered(case, target)


def test_egress_input_order_does_not_matter() -> None:
    """Egress allocations and their labels in any order render to the same policies."""
    cluster = CASES["dual-stack"]
    shuffled = [
        (EgressIdentity(i.namespace, dict(reversed(list(i.labels.items())))), a)
        for i, a in reversed(EGRESS["dual-stack"])
    ]
    expected = render(cluster, "egress-policy", egress=EGRESS["dual-stack"])
    assert render(cluster, "egress-policy", egress=shuffled) == expected
    ipv6 = CASES["ipv6"]
    assert render(ipv6, "egress-policy", egress=EGRESS["ipv6"][::-1]) == rendered(
        "ipv6", "egress-policy"
    )


def test_gateway_label_order_does_not_matter() -> None:
    """The gateway node selector is sorted, whatever order the setting lists it in."""
    tunnel = CASES["tunnel"]
    swapped = plan(
        "lab-tunnel",
        ClusterSettings(
            routing_mode="tunnel",
            ipv6_masquerade=True,
            dns_domain="lab.example",
            egress_gateway_labels="kipam.io/egress-gateway=true,topology.kubernetes.io/zone=a",
        ),
        "fd3c:9e12:4::/48",
    )
    egress = [(WEB, nth(tunnel, 6, 5))]
    assert render(swapped, "egress-policy", egress=egress) == render(
        tunnel, "egress-policy", egress=egress
    )


# -- refusals -----------------------------------------------------------------------------------


def test_unknown_target_is_an_invalid_request() -> None:
    """An unknown target is refused with a message that lists every target."""
    with pytest.raises(InvalidRequestError) as caught:
        render(CASES["ipv6"], "helmfile")
    assert caught.value.field == "target"
    assert all(target in str(caught.value) for target in TARGETS)


@pytest.mark.parametrize(
    "address",
    ["fd3c:9e12:1:1001::2:0/120", "fd3c:ffff::1", "10.20.149.1"],
    ids=["not-a-host", "outside-the-pool", "other-family-no-pool"],
)
def test_egress_address_must_be_one_address_of_the_egress_pools(address: str) -> None:
    """An egress address that is a prefix, or outside the egress pools, is refused."""
    parsed = parse_prefix(address) if "/" in address else parse_address(address)
    with pytest.raises(InvalidRequestError) as caught:
        render(CASES["ipv6"], "egress-policy", egress=[(BILLING, parsed)])
    assert caught.value.field == "egress"


def test_one_identity_gets_one_address_per_family() -> None:
    """Two IPv6 egress addresses for one identity would give two policies one name."""
    cluster = CASES["ipv6"]
    egress = [(BILLING, nth(cluster, 6, 1)), (BILLING, nth(cluster, 6, 2))]
    with pytest.raises(InvalidRequestError, match="two IPv6"):
        render(cluster, "egress-policy", egress=egress)


def test_dual_stack_cluster_without_ipv4_pools_is_refused() -> None:
    """Dual-stack settings with only IPv6 pools cannot render dual-stack lists."""
    broken = plan("half", ClusterSettings(family="dual-stack"), "fd3c:9e12:5::/48")
    with pytest.raises(InvalidRequestError) as caught:
        render(broken, "kubeadm")
    assert caught.value.field == "cluster"


# -- the validators bite ------------------------------------------------------------------------


def test_made_up_values_keys_are_caught() -> None:
    """A key the chart's values.yaml does not have is reported, at any depth."""
    values = {
        "ipv6": {"enabled": True, "bogus": 1},
        "madeUpKey": True,
        "podAnnotations": {"a": "b"},
    }
    assert upstream.unknown_keys(values) == ["ipv6.bogus", "madeUpKey"]
    assert upstream.values_errors(values) == [
        "ipv6.bogus: not a key of the chart's values.yaml",
        "madeUpKey: not a key of the chart's values.yaml",
    ]


def test_values_of_the_wrong_type_are_caught() -> None:
    """values.schema.json refuses a string where the chart takes a boolean."""
    errors = upstream.values_errors({"ipv6": {"enabled": "yes"}})
    assert errors == ["ipv6.enabled: 'yes' is not of type 'boolean'"]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("spec", "allowFirstLastIPs"), False, "spec.allowFirstLastIPs: False is not of type"),
        (("spec", "blocks"), "fd3c::/112", "spec.blocks: 'fd3c::/112' is not of type 'array'"),
        (("spec", "blocks", 0, "cidr"), "fd3c::/129", "spec.blocks.0.cidr: 'fd3c::/129' is not"),
        (("spec", "announce"), True, "Additional properties are not allowed ('announce'"),
        (("metadata", "name"), "Eu1_Ingress", "metadata.name: 'Eu1_Ingress' is not a DNS-1123"),
        (("apiVersion",), "cilium.io/v1", "CiliumLoadBalancerIPPool v1 is not served"),
    ],
    ids=["enum-type", "blocks-type", "cidr-format", "unknown-field", "name", "version"],
)
def test_lb_ippool_crd_schema_bites(path: tuple[Any, ...], value: Any, expected: str) -> None:
    """A CiliumLoadBalancerIPPool with a wrong field fails the pinned CRD."""
    pool = documents(rendered("ipv6", "lb-ippool"))[0]
    *parents, last = path
    node = pool
    for step in parents:
        node = node[step]
    node[last] = value
    errors = upstream.crd_errors(pool)
    assert any(expected in e for e in errors), errors


def test_egress_crd_still_checks_ipv4_destinations() -> None:
    """The IPv6 allowance does not hide a bad IPv4 destination or a missing gateway."""
    policy = documents(rendered("dual-stack", "egress-policy"))[1]
    policy["spec"]["destinationCIDRs"] = ["300.0.0.0/0"]
    del policy["spec"]["egressGateway"]["nodeSelector"]
    errors = upstream.crd_errors(policy)
    assert len(errors) == 2, errors


def test_pinned_egress_crd_still_rejects_ipv6_destinations() -> None:
    """The pinned CRD refuses '::/0' (IPv4CIDR); when a newer one does not, drop KNOWN_GAPS."""
    schema = upstream.crd_schema("CiliumEgressGatewayPolicy", "v2")
    item = schema["properties"]["spec"]["properties"]["destinationCIDRs"]["items"]
    assert re.search(item["pattern"], "::/0") is None
    assert re.search(item["pattern"], "0.0.0.0/0") is not None


def test_service_cidr_validation_bites() -> None:
    """kubernetes-validate (strict) refuses an unknown field in a ServiceCIDR."""
    service = documents(rendered("ipv6", "service-cidr"))[0]
    service["spec"]["ipFamilies"] = ["IPv6"]
    assert upstream.builtin_errors(service)


def test_kubeadm_structure_check_bites() -> None:
    """The v1beta3 map form of extraArgs, and a bad subnet, fail the kubeadm check."""
    config = documents(rendered("ipv6", "kubeadm"))[0]
    config["controllerManager"]["extraArgs"] = {"allocate-node-cidrs": "false"}
    config["networking"]["podSubnet"] = "fd3c::/52,fd3d::/52"
    errors = upstream.kubeadm_errors(config)
    assert len(errors) == 2, errors


def test_kcm_flag_check_bites() -> None:
    """A flag kipam does not render, or a non-boolean boolean, fails the flag check."""
    errors = upstream.kcm_flag_errors(["--allocate-node-cidrs=yes", "--cidr-allocator-type=x"])
    assert len(errors) == 2, errors


def test_lb_pools_hold_exactly_each_services_vips() -> None:
    """One LB-IPAM pool per Service: its VIPs only, selected by Cilium's Service labels."""
    pools = documents(rendered("ipv6", "lb-ippool"))
    assert [p["metadata"]["annotations"]["kipam.io/owner"] for p in pools] == [
        "service/default/api",
        "service/ingress-nginx/controller",
    ]
    api = pools[0]["spec"]
    assert api["blocks"] == [{"cidr": str(VIPS["ipv6"][1][2])}]
    assert api["serviceSelector"]["matchLabels"] == {
        "io.kubernetes.service.name": "api",
        "io.kubernetes.service.namespace": "default",
    }
    dual = documents(rendered("dual-stack", "lb-ippool"))
    assert [ipaddress.ip_network(b["cidr"]).version for b in dual[0]["spec"]["blocks"]] == [6, 4]
    assert render(CASES["ipv6-cluster-pool"], "lb-ippool").count("\n") == 1  # header only


def test_a_vip_outside_the_ingress_pools_is_refused() -> None:
    """The LB pools never name an address kipam did not hand out from the ingress pools."""
    outside = nth(CASES["ipv6"], 6, 1)  # an egress address
    with pytest.raises(InvalidRequestError) as caught:
        render(CASES["ipv6"], "lb-ippool", vips=[("default", "web", outside)])
    assert caught.value.field == "vips"


def test_egress_gateway_and_kube_proxy_replacement_follow_the_settings() -> None:
    """The egress gateway (and BPF masquerading) only when asked; k8sServiceHost with KPR."""
    off = documents(rendered("ipv6", "cilium-values"))[0]
    assert "egressGateway" not in off
    assert "bpf" not in off
    assert (off["kubeProxyReplacement"], off["k8sServiceHost"]) == (True, "auto")
    on = documents(rendered("tunnel", "cilium-values"))[0]
    assert (on["egressGateway"], on["bpf"]) == ({"enabled": True}, {"masquerade": True})
    plain = dataclasses.replace(
        CASES["ipv6"], settings=ClusterSettings(kube_proxy_replacement=False)
    )
    values = documents(render(plain, "cilium-values"))[0]
    assert values["kubeProxyReplacement"] is False
    assert "k8sServiceHost" not in values
