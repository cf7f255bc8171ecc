"""Validators for rendered bootstrap configuration, against upstream schemas kept as test data.

Everything is offline (``tests/data/upstream/README.md`` names each file's repository, commit
and size):

- Cilium custom resources: the CRD's ``openAPIV3Schema`` for the served version, with JSON
  Schema Draft 4 (OpenAPI 3.0 schemas follow Draft 4's keyword meanings), Kubernetes formats
  (``cidr``, ``ip``) checked, ``x-kubernetes-*`` extensions ignored (no keyword of ours depends
  on them), and unknown fields rejected as ``kubectl apply --validate=strict`` does. ``metadata``
  (``type: object`` in every CRD) is checked here: name, labels, annotations, no namespace for
  cluster-scoped kinds.
- Cilium Helm values: the chart's ``values.schema.json`` (Draft 7, types only) plus a walk
  proving every key path exists in the chart's ``values.yaml`` (the schema allows any key).
- Built-in kinds: ``kubernetes-validate``, strict, at :data:`KUBERNETES_VERSION`.
- kubeadm ``ClusterConfiguration`` and kube-controller-manager flags: no schema exists offline,
  so their structure is checked by hand.

Each ``*_errors`` function returns messages (empty: valid), so tests can prove it bites;
:func:`validate_rendered` raises ``AssertionError`` with all of them.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import jsonschema
import kubernetes_validate
import yaml

if TYPE_CHECKING:
    from collections.abc import Sequence

DATA: Final = Path(__file__).resolve().parents[1] / "data" / "upstream"
CHART: Final = DATA / "cilium-main-0079af0" / "install" / "kubernetes" / "cilium"
_CRDS: Final = "pkg/k8s/apis/cilium.io/client/crds/v2"
CRD_FILES: Final = {
    "CiliumLoadBalancerIPPool": DATA / "cilium-5575315" / _CRDS / "ciliumloadbalancerippools.yaml",
    "CiliumEgressGatewayPolicy": DATA
    / "cilium-076bbeb"
    / _CRDS
    / "ciliumegressgatewaypolicies.yaml",
}
# ServiceCIDR is GA since 1.33; 1.34 is the first release where the multi-CIDR allocator is
# locked on (research notes section 3), the minimum kipam's service-cidr target is meant for.
KUBERNETES_VERSION: Final = "1.34.0"
# Errors the pinned upstream files are known to raise against correct output, each with why.
# The pinned CiliumEgressGatewayPolicy CRD types destinationCIDRs as IPv4CIDR (a pattern for
# IPv4 only): it predates IPv6 egress gateway (see the README). Tolerated for IPv6 CIDRs only.
KNOWN_GAPS: Final = (("CiliumEgressGatewayPolicy", "spec.destinationCIDRs.", "pattern"),)

_DNS_LABEL: Final = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN: Final = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_LABEL_KEY: Final = re.compile(
    rf"({_DNS_SUBDOMAIN.pattern}/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")

_FORMATS: Final = jsonschema.FormatChecker()


@_FORMATS.checks("cidr", raises=ValueError)
def _is_cidr(value: object) -> bool:
    """Kubernetes ``format: cidr`` (Go's ``net.ParseCIDR``: host bits may be set)."""
    if isinstance(value, str):
        ipaddress.ip_network(value, strict=False)
    return True


@_FORMATS.checks("ip", raises=ValueError)
def _is_ip(value: object) -> bool:
    """Kubernetes ``format: ip``."""
    if isinstance(value, str):
        ipaddress.ip_address(value)
    return True


# -- loading ------------------------------------------------------------------------------------


@functools.cache
def chart_values() -> dict[str, Any]:
    """The pinned chart's ``values.yaml``."""
    return yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))


@functools.cache
def values_schema() -> dict[str, Any]:
    """The pinned chart's ``values.schema.json``."""
    return json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """The pinned ``CustomResourceDefinition`` of a Cilium kind."""
    return yaml.safe_load(CRD_FILES[kind].read_text(encoding="utf-8"))


def crd_schema(kind: str, version: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of one served version, made strict about unknown fields."""
    for entry in crd(kind)["spec"]["versions"]:
        if entry["name"] == version and entry["served"]:
            return _strict(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
    raise LookupError(f"{kind} {version} is not served by the pinned CRD")


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject fields a schema does not name, as strict field validation does."""
    if "properties" in schema and "additionalProperties" not in schema:
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        if not preserve:
            schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for sub in schema.get(key, {}).values():
            _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


# -- Cilium custom resources --------------------------------------------------------------------


def crd_errors(obj: Any) -> list[str]:
    """What is wrong with a Cilium custom resource, per its pinned CRD (empty: valid)."""
    if not isinstance(obj, dict):
        return [f"a custom resource must be a map, not {type(obj).__name__}"]
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} has no pinned CRD (known: {', '.join(CRD_FILES)})"]
    spec = crd(kind)["spec"]
    group, _, version = str(obj.get("apiVersion", "")).partition("/")
    if group != spec["group"]:
        return [f"apiVersion {obj.get('apiVersion')!r}: the group of {kind} is {spec['group']}"]
    try:
        schema = crd_schema(kind, version)
    except LookupError as exc:
        return [str(exc)]
    errors = _metadata_errors(obj.get("metadata"), namespaced=spec["scope"] == "Namespaced")
    validator = jsonschema.Draft4Validator(schema, format_checker=_FORMATS)
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path)
        if _known_gap(kind, path, error):
            continue
        errors.append(f"{path or '<root>'}: {error.message}")
    return errors


def _known_gap(kind: str, path: str, error: jsonschema.ValidationError) -> bool:
    """Whether an error is one of :data:`KNOWN_GAPS` (an IPv6 CIDR an old CRD refuses)."""
    for gap_kind, prefix, validator in KNOWN_GAPS:
        if kind == gap_kind and path.startswith(prefix) and error.validator == validator:
            return isinstance(error.instance, str) and ":" in error.instance
    return False


def _metadata_errors(metadata: Any, *, namespaced: bool) -> list[str]:
    """ObjectMeta rules that a CRD's ``metadata: {type: object}`` leaves to the apiserver."""
    if not isinstance(metadata, dict):
        return ["metadata: must be a map"]
    errors = []
    name = metadata.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    if not namespaced and "namespace" in metadata:
        errors.append("metadata.namespace: the kind is cluster-scoped")
    allowed = {"name", "labels", "annotations"} | ({"namespace"} if namespaced else set())
    errors += [
        f"metadata.{key}: not expected in rendered objects" for key in metadata.keys() - allowed
    ]
    for key, value in (metadata.get("labels") or {}).items():
        if (
            not isinstance(key, str)
            or not _LABEL_KEY.fullmatch(key)
            or len(key.rpartition("/")[2]) > 63
        ):
            errors.append(f"metadata.labels: {key!r} is not a label key")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            errors.append(f"metadata.labels[{key!r}]: {value!r} is not a label value")
    for key, value in (metadata.get("annotations") or {}).items():
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key) or not isinstance(value, str):
            errors.append(f"metadata.annotations: {key!r}: {value!r} is not a string annotation")
    return errors


# -- Cilium Helm values -------------------------------------------------------------------------


def values_errors(values: Any) -> list[str]:
    """What is wrong with Helm values for the pinned Cilium chart (empty: valid)."""
    validator = jsonschema.Draft7Validator(values_schema())
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(values)
    ]
    return errors + [
        f"{path}: not a key of the chart's values.yaml" for path in unknown_keys(values)
    ]


def unknown_keys(values: Any, chart: Any = None, path: str = "") -> list[str]:
    """Every key path in ``values`` that the chart's ``values.yaml`` does not have.

    A map in the chart with no keys (``podAnnotations: {}``) is free-form: anything goes under
    it. A list or scalar in the chart is a leaf: its value is the schema's business.
    """
    chart = chart_values() if chart is None and not path else chart
    if not isinstance(values, dict):
        return []
    if not isinstance(chart, dict):
        return [path] if chart is not None else []
    if not chart:
        return []
    unknown = []
    for key, value in values.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in chart:
            unknown.append(where)
        else:
            unknown += unknown_keys(value, chart[key], where)
    return unknown


# -- built-in kinds -----------------------------------------------------------------------------


def builtin_errors(obj: Any) -> list[str]:
    """What is wrong with a built-in Kubernetes object, per ``kubernetes-validate`` (strict)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path) or '<root>'}: {exc.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        return [str(exc)]
    return _metadata_errors(obj.get("metadata"), namespaced=False)


# -- kubeadm and kube-controller-manager --------------------------------------------------------

# ClusterConfiguration's fields in kubeadm.k8s.io/v1beta4 (cmd/kubeadm/app/apis/kubeadm/v1beta4
# types.go), and its Networking's.
_KUBEADM_FIELDS: Final = {
    "apiVersion", "kind", "etcd", "networking", "kubernetesVersion", "controlPlaneEndpoint",
    "apiServer", "controllerManager", "scheduler", "dns", "proxy", "certificatesDir",
    "imageRepository", "featureGates", "clusterName", "encryptionAlgorithm",
    "certificateValidityPeriod", "caCertificateValidityPeriod",
}  # fmt: skip
_NETWORKING_FIELDS: Final = {"serviceSubnet", "podSubnet", "dnsDomain"}
_COMPONENT_FIELDS: Final = {"extraArgs", "extraVolumes", "extraEnvs"}
# The kube-controller-manager flags kipam renders, with what their values must be.
_KCM_FLAGS: Final = {
    "allocate-node-cidrs": "bool",
    "cluster-cidr": "cidrs",
    "service-cluster-ip-range": "cidrs",
    "node-cidr-mask-size-ipv6": "int",
    "node-cidr-mask-size-ipv4": "int",
}


def dual_stack_errors(text: Any, where: str) -> list[str]:
    """A Kubernetes CIDR list: one or two CIDRs, no host bits, at most one per family."""
    if not isinstance(text, str) or not text:
        return [f"{where}: must be a non-empty string"]
    try:
        nets = [ipaddress.ip_network(part) for part in text.split(",")]
    except ValueError as exc:
        return [f"{where}: {exc}"]
    if len(nets) > 2 or len({n.version for n in nets}) != len(nets):
        return [f"{where}: {text!r} is not one CIDR per family"]
    return []


def kubeadm_errors(doc: Any) -> list[str]:
    """A structural check of a ``ClusterConfiguration`` (no kubeadm schema exists offline)."""
    if not isinstance(doc, dict):
        return ["ClusterConfiguration must be a map"]
    errors = []
    if (
        doc.get("apiVersion") != "kubeadm.k8s.io/v1beta4"
        or doc.get("kind") != "ClusterConfiguration"
    ):
        errors.append("apiVersion/kind: not kubeadm.k8s.io/v1beta4 ClusterConfiguration")
    errors += [f"{key}: not a ClusterConfiguration field" for key in doc.keys() - _KUBEADM_FIELDS]
    networking = doc.get("networking")
    if not isinstance(networking, dict):
        return [*errors, "networking: must be a map"]
    errors += [f"networking.{key}: unknown" for key in networking.keys() - _NETWORKING_FIELDS]
    errors += dual_stack_errors(networking.get("podSubnet"), "networking.podSubnet")
    errors += dual_stack_errors(networking.get("serviceSubnet"), "networking.serviceSubnet")
    domain = networking.get("dnsDomain")
    if not isinstance(domain, str) or not _DNS_SUBDOMAIN.fullmatch(domain):
        errors.append(f"networking.dnsDomain: {domain!r} is not a DNS-1123 subdomain")
    manager = doc.get("controllerManager", {})
    if not isinstance(manager, dict):
        return [*errors, "controllerManager: must be a map"]
    errors += [f"controllerManager.{key}: unknown" for key in manager.keys() - _COMPONENT_FIELDS]
    return errors + _extra_args_errors(manager.get("extraArgs", []))


def _extra_args_errors(args: Any) -> list[str]:
    """v1beta4 ``extraArgs``: a list of ``{name, value}`` strings, each flag once."""
    where = "controllerManager.extraArgs"
    if not isinstance(args, list):
        return [f"{where}: v1beta4 takes a list of {{name, value}}"]
    errors = []
    names = []
    for i, arg in enumerate(args):
        if not isinstance(arg, dict) or set(arg) != {"name", "value"}:
            errors.append(f"{where}[{i}]: must be exactly {{name, value}}")
        elif not all(isinstance(arg[k], str) for k in ("name", "value")):
            errors.append(f"{where}[{i}]: name and value must be strings")
        else:
            names.append(arg["name"])
            errors += _flag_errors(arg["name"], arg["value"], f"{where}[{i}]")
    if len(names) != len(set(names)):
        errors.append(f"{where}: a flag is given twice")
    return errors


def kcm_flag_errors(doc: Any) -> list[str]:
    """A structural check of kube-controller-manager flags (``--name=value`` strings)."""
    if not isinstance(doc, list):
        return ["kcm-flags must be a list"]
    errors = []
    for i, flag in enumerate(doc):
        if not isinstance(flag, str) or not flag.startswith("--") or "=" not in flag:
            errors.append(f"[{i}]: {flag!r} is not --name=value")
            continue
        name, _, value = flag[2:].partition("=")
        errors += _flag_errors(name, value, f"[{i}]")
    return errors


def _flag_errors(name: str, value: str, where: str) -> list[str]:
    kind = _KCM_FLAGS.get(name)
    if kind is None:
        return [f"{where}: {name} is not a flag kipam renders"]
    if kind == "bool" and value not in ("true", "false"):
        return [f"{where}: {name}={value!r} is not true or false"]
    if kind == "int" and not value.isdigit():
        return [f"{where}: {name}={value!r} is not a number"]
    if kind == "cidrs":
        return dual_stack_errors(value, f"{where}: {name}")
    return []


# -- one entry point ----------------------------------------------------------------------------


def rendered_errors(target: str, documents: Sequence[Any]) -> list[str]:
    """Every error in the documents of one rendered target (empty: all valid)."""
    if target in {"egress-policy", "lb-ippool"}:  # one object per holder, perhaps none
        return [f"[{i}] {e}" for i, doc in enumerate(documents) for e in crd_errors(doc)]
    if len(documents) != 1:
        return [f"{target}: expected one document, got {len(documents)}"]
    doc = documents[0]
    checks = {
        "kubeadm": kubeadm_errors,
        "kcm-flags": kcm_flag_errors,
        "cilium-values": values_errors,
        "lb-ippool": crd_errors,
        "service-cidr": builtin_errors,
    }
    return checks[target](doc)


def validate_rendered(target: str, documents: Sequence[Any]) -> None:
    """Assert that the documents of one rendered target are valid upstream."""
    errors = rendered_errors(target, documents)
    assert not errors, f"{target}:\n  " + "\n  ".join(errors)
