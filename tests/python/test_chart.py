"""charts/opennebula, rendered offline with the Helm v4 SDK and checked object by object."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections import Counter

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    ONED_KEY,
    RELEASE,
    SIDECAR_UID,
    USER_CA_KEY,
    VALUE_SETS,
    Rendered,
    load_chart,
    rendered,
)

SERVICE_PORTS = {("ssh", 22, "TCP"), ("monitord-tcp", 4124, "TCP"), ("monitord-udp", 4124, "UDP")}

# The Prometheus Operator CRD is not in kubernetes-validate: a schema of our own for the part of
# monitoring.coreos.com/v1 ServiceMonitor the chart uses.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h))+)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h))+)$"},
                        },
                    },
                },
            },
        },
    },
}


def ports_of(service: dict) -> set[tuple[str, int, str]]:
    return {(p["name"], p["port"], p.get("protocol", "TCP")) for p in service["spec"]["ports"]}


def pem_body(pem: str) -> bytes:
    lines = [line for line in pem.strip().splitlines() if not line.startswith("-----")]
    return base64.b64decode("".join(lines))


# ---------------------------------------------------------------------------------------------
# lint, schema, Kubernetes validation


def test_lint_has_no_errors_or_warnings():
    for values in VALUE_SETS.values():
        report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        assert report["errors"] == []
        bad = [m for m in report["messages"] if m["severity"] >= 2]
        assert bad == [], bad


def test_every_object_validates_strictly(r: Rendered):
    kinds = Counter(o["kind"] for o in r.objects)
    assert kinds["StatefulSet"] == 1 and kinds["Service"] == 2 and kinds["ConfigMap"] == 1
    for obj in r.objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_object_names_are_unique_per_kind(r: Rendered):
    names = Counter((o["kind"], o["metadata"]["name"]) for o in r.objects)
    assert all(n == 1 for n in names.values()), names
    for obj in r.objects:
        assert obj["metadata"]["namespace"] == NAMESPACE


def test_standard_labels_everywhere(r: Rendered):
    for obj in r.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "opennebula"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("opennebula-")
        assert "app.kubernetes.io/version" in labels
        for key, value in r.values.get("commonLabels", {}).items():
            assert labels[key] == value


def test_schema_rejects_bad_values():
    with load_chart() as chart:
        chart.validate_schema({})
        for v in VALUE_SETS.values():
            chart.validate_schema(v)
        bad = [
            {"sidecar": {"admin": {"port": "9124"}}},
            {"sidecar": {"admin": {"port": 70000}}},
            {"service": {"nodePorts": {"ssh": "30022"}}},
            {"service": {"type": "ExternalName"}},
            {"service": {"externalTrafficPolicy": "Nearest"}},
            {"podSecurityContext": {"unprivilegedPortStart": 1024}},
            {"sidecar": {"shutdownGrace": "30s"}},
            {"keys": {"authorizedKeys": "ssh-ed25519 AAAA"}},
            {"no_such_value": True},
        ]
        for values in bad:
            with pytest.raises(helm_python.HelmValuesError):
                chart.validate_schema(values)
        # the schema is enforced on render too, not only on demand
        with pytest.raises(helm_python.HelmError):
            chart.render({"sidecar": {"admin": {"port": "9124"}}}, name=RELEASE, namespace=NAMESPACE)


def test_values_are_documented():
    """Every leaf of values.yaml has a `## @param` line (bitnami style)."""
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param ([\w.]+)", text, re.M))
    values = yaml.safe_load(text)

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and not any(path.startswith(d) for d in documented):
                yield from leaves(value, path + ".")
            else:
                yield path

    missing = [p for p in leaves(values) if p not in documented]
    assert missing == []
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"])


# ---------------------------------------------------------------------------------------------
# Services and ports


def test_both_services_carry_ssh_and_monitord_ports(r: Rendered):
    for svc in (r.headless, r.external):
        ports = svc["spec"]["ports"]
        names = [p["name"] for p in ports]
        assert len(names) == len(set(names)), f"duplicate port names in {svc['metadata']['name']}"
        assert SERVICE_PORTS <= ports_of(svc)
        for p in ports:
            assert p["targetPort"] == p["name"]
        assert svc["spec"]["selector"] == r.statefulset["spec"]["selector"]["matchLabels"]
    assert r.headless["spec"]["clusterIP"] == "None"
    assert r.statefulset["spec"]["serviceName"] == r.headless["metadata"]["name"]
    admin = r.values.get("sidecar", {}).get("admin", {}).get("port", 9124)
    assert ports_of(r.headless) == SERVICE_PORTS | {("admin", admin, "TCP")}
    assert ports_of(r.external) == SERVICE_PORTS


def test_sidecar_declares_the_same_container_ports(r: Rendered):
    ports = r.sidecar["ports"]
    declared = {(p["name"], p["containerPort"], p["protocol"]) for p in ports}
    assert SERVICE_PORTS <= declared
    assert ("admin", 9124, "TCP") in declared
    assert len({p["name"] for p in ports}) == len(ports)
    # every Service targetPort names a sidecar port
    for svc in (r.headless, r.external):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in {name for name, _, _ in declared}


def test_service_types():
    default = rendered("default").external["spec"]
    assert default["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in default and "loadBalancerSourceRanges" not in default

    lb = rendered("loadbalancer").external
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["spec"]["externalTrafficPolicy"] == "Local"
    assert lb["spec"]["loadBalancerSourceRanges"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert lb["spec"]["loadBalancerClass"] == "example.com/lb"
    assert lb["metadata"]["annotations"]["metallb.universe.tf/allow-shared-ip"] == "one"

    np = rendered("nodeport").external["spec"]
    assert np["type"] == "NodePort"
    assert np["externalTrafficPolicy"] == "Cluster"
    assert {p["name"]: p["nodePort"] for p in np["ports"]} == {
        "ssh": 30022,
        "monitord-tcp": 30124,
        "monitord-udp": 30124,
    }
    assert "loadBalancerSourceRanges" not in np
    # the headless Service never gets node ports
    assert all("nodePort" not in p for p in rendered("nodeport").headless["spec"]["ports"])


# ---------------------------------------------------------------------------------------------
# Security


def test_sidecar_security_context_and_sysctl(r: Rendered):
    pod = r.pod_spec
    sysctls = {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]}
    assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= 22
    assert pod["securityContext"]["fsGroup"] == SIDECAR_UID
    assert pod["automountServiceAccountToken"] is False
    test_pod = r.one("Pod")
    for container in (r.sidecar, r.container("install-keys"), test_pod["spec"]["containers"][0]):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == SIDECAR_UID
        assert sc["runAsGroup"] == SIDECAR_UID
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # readOnlyRootFilesystem: the sidecar gets writable scratch space as volumes
    mounts = {m["mountPath"]: m for m in r.sidecar["volumeMounts"]}
    for path in ("/tmp", "/var/tmp", "/var/lib/one", "/var/lib/one/datastores", "/run/one"):
        assert not mounts[path].get("readOnly", False), path


def test_secrets_are_mounted_read_only_with_restrictive_modes(r: Rendered):
    pod = r.pod_spec
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_volumes = {name for name, v in volumes.items() if "secret" in v}
    assert secret_volumes, "no Secret volume"
    keys_secret = r.values.get("keys", {}).get("existingSecret") or f"{r.fullname}-keys"
    for name in secret_volumes:
        secret = volumes[name]["secret"]
        assert secret["secretName"] == keys_secret
        mode = secret["defaultMode"]
        assert mode & 0o007 == 0, f"{name}: others may read ({mode:o})"
        assert mode & 0o222 == 0, f"{name}: writable mode ({mode:o})"
    mounted = 0
    for container in pod["containers"] + pod["initContainers"]:
        for m in container.get("volumeMounts", []):
            if m["name"] in secret_volumes:
                mounted += 1
                assert m.get("readOnly") is True, f"{container['name']} mounts {m['name']} writable"
    assert mounted >= 2
    # private keys reach the sidecar as 0400 copies on a memory emptyDir, mounted read-only
    assert volumes["private-keys"]["emptyDir"]["medium"] == "Memory"
    sidecar_mounts = {m["name"]: m for m in r.sidecar["volumeMounts"]}
    assert sidecar_mounts["private-keys"]["readOnly"] is True
    assert "keys-secret" not in sidecar_mounts
    key_dir = sidecar_mounts["private-keys"]["mountPath"]
    host_keys = r.arg_values("--host-key")
    assert host_keys == [f"{key_dir}/{n}" for n in r.values.get("keys", {}).get("hostKeyNames", ["ssh_host_ed25519_key"])]
    init = r.container("install-keys")
    script = init["command"][2]
    assert "install -m 0400" in script and "umask 077" in script
    assert init["command"][4:] == [p.rsplit("/", 1)[1] for p in host_keys + r.arg_values("--monitord-private-key")]
    auth_dir = sidecar_mounts["client-keys"]["mountPath"]
    assert r.arg_values("--authorized-keys") == [f"{auth_dir}/authorized_keys"]


def test_hostname_maps_to_loopback_and_matches_oned_conf(r: Rendered):
    host = r.values.get("frontend", {}).get("hostname") or f"{r.fullname}.{NAMESPACE}.svc"
    assert r.pod_spec["hostAliases"] == [{"ip": "127.0.0.1", "hostnames": [host]}]
    cm = r.one("ConfigMap")
    assert cm["data"]["HOSTNAME"] == host
    assert f'HOSTNAME = "{host}"' in cm["data"]["oned.conf"]
    monitord = cm["data"]["monitord.conf"]
    assert 'ADDRESS         = "127.0.0.1"' in monitord
    assert f'MONITOR_ADDRESS = "{host}"' in monitord
    assert "PORT            = 4124" in monitord
    oned = r.container("oned")
    config_mount = next(m for m in oned["volumeMounts"] if m["name"] == "opennebula-config")
    assert config_mount["readOnly"] is True
    assert host in r.notes and "ssh-keyscan" in r.notes


def test_monitord_relay_binds_pod_ip_and_forwards_to_loopback(r: Rendered):
    env = {e["name"]: e for e in r.sidecar["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert r.arg_values("--monitord-listen") == ["$(POD_IP):4124"]
    assert r.arg_values("--monitord-upstream") == ["127.0.0.1:4124"]
    assert r.arg_values("--ssh-listen") == ["0.0.0.0:22"]
    assert r.arg_values("--admin-listen") == ["0.0.0.0:9124"]
    assert r.arg_values("--home") == ["/var/lib/one"]
    assert r.arg_values("--transfer-root")[0] == "/var/lib/one/datastores"
    assert r.arg_values("--allow-user") == ["oneadmin"]
    assert r.arg_values("--log-format") == ["json"]


def test_probes_use_the_admin_port(r: Rendered):
    sc = r.sidecar
    assert sc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sc["startupProbe"]["httpGet"]["port"] == "admin"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert "tcpSocket" not in sc[probe], "a TCP probe on :22 looks like an aborted login"


def test_termination_grace_covers_the_shutdown_grace(r: Rendered):
    grace = int(r.arg_values("--shutdown-grace")[0])
    assert r.pod_spec["terminationGracePeriodSeconds"] >= grace
    with pytest.raises(helm_python.HelmRenderError, match="terminationGracePeriodSeconds"):
        Rendered({"terminationGracePeriodSeconds": 10, "sidecar": {"shutdownGrace": 30}})


def test_shared_volumes(r: Rendered):
    sts = r.statefulset
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    assert "datastores" in claims
    home_pvc = r.values.get("persistence", {}).get("home", {}).get("enabled", True)
    assert ("home" in claims) == home_pvc
    if not home_pvc:
        assert any(v["name"] == "home" and "emptyDir" in v for v in r.pod_spec["volumes"])
    for claim in claims.values():
        # volumeClaimTemplates are immutable: no labels that change with the chart version
        assert set(claim["metadata"]["labels"]) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
    for name in ("oned", "tm-sidecar"):
        mounts = {m["mountPath"]: m["name"] for m in r.container(name)["volumeMounts"]}
        assert mounts["/var/lib/one/datastores"] == "datastores"
        assert mounts["/var/lib/one"] == "home"
        assert mounts["/run/one"] == "run"


# ---------------------------------------------------------------------------------------------
# Keys: generation, lookup on upgrade, existingSecret


def secret_data(r: Rendered) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in r.one("Secret")["data"].items()}


def test_generated_keys_have_the_expected_formats():
    data = secret_data(rendered("loadbalancer"))
    host = data["ssh_host_ed25519_key"]
    assert host.startswith("-----BEGIN " + "PRIVATE KEY-----")  # PKCS#8
    assert bytes.fromhex("06032b6570") in pem_body(host)  # OID 1.3.101.112 = Ed25519
    monitord = data["monitord_rsa"]
    assert monitord.startswith("-----BEGIN " + "RSA " + "PRIVATE KEY-----")  # PKCS#1, for OpenSSL
    assert data["authorized_keys"] == f"{ONED_KEY}\n" + VALUE_SETS["loadbalancer"]["keys"]["authorizedKeys"][1] + "\n"
    assert data["trusted_user_ca_keys"] == f"{USER_CA_KEY}\n"
    default = secret_data(rendered("default"))
    assert default["authorized_keys"] == ""
    assert set(default) == {"ssh_host_ed25519_key", "authorized_keys"}


def test_keys_secret_survives_uninstall_when_asked():
    secret = rendered("default").one("Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    r = Rendered({"keys": {"keepOnUninstall": False}})
    assert "helm.sh/resource-policy" not in r.one("Secret")["metadata"].get("annotations", {})


def test_template_looks_up_the_live_secret():
    text = (CHART / "templates" / "_lookup.tpl").read_text()
    assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace \(include "opennebula\.keysSecretName" \.\)', text)
    secret_template = (CHART / "templates" / "secret-keys.yaml").read_text()
    assert 'include "opennebula.liveKeysSecret"' in secret_template


def test_upgrade_keeps_generated_keys(tmp_path):
    """Install, then upgrade with `lookup` answering the installed Secret: keys are kept."""
    values = {"keys": {"monitordEncryption": {"enabled": True}, "authorizedKeys": [ONED_KEY]}}
    first = Rendered(values)
    installed = first.one("Secret")

    # Offline the SDK's lookup answers {}: a second install makes new keys...
    again = Rendered(values)
    assert again.one("Secret")["data"]["ssh_host_ed25519_key"] != installed["data"]["ssh_host_ed25519_key"]

    # ...while an upgrade, where lookup returns the live Secret, keeps them.
    chart = tmp_path / "opennebula"
    shutil.copytree(CHART, chart)
    live = {"apiVersion": "v1", "kind": "Secret", "metadata": installed["metadata"], "data": installed["data"]}
    (chart / "templates" / "_lookup.tpl").write_text(
        '{{- define "opennebula.liveKeysSecret" -}}\n'
        + "{{- `" + json.dumps(live) + "` -}}\n"
        + "{{- end -}}\n"
    )
    upgraded_values = {"keys": {"monitordEncryption": {"enabled": True}, "authorizedKeys": [ONED_KEY, USER_CA_KEY]}}
    upgraded = Rendered(upgraded_values, chart).one("Secret")["data"]
    assert upgraded["ssh_host_ed25519_key"] == installed["data"]["ssh_host_ed25519_key"]
    assert upgraded["monitord_rsa"] == installed["data"]["monitord_rsa"]
    # authorized_keys follows the new values
    assert base64.b64decode(upgraded["authorized_keys"]).decode() == f"{ONED_KEY}\n{USER_CA_KEY}\n"
    # a generated monitord key is kept even while encryption is switched off
    off = Rendered({"keys": {"monitordEncryption": {"enabled": False}}}, chart).one("Secret")["data"]
    assert off["monitord_rsa"] == installed["data"]["monitord_rsa"]


def test_existing_secret_is_used_instead_of_generating():
    r = rendered("existingsecret")
    assert r.of_kind("Secret") == []
    assert r.arg_values("--host-key") == [
        "/etc/tm-sidecar/keys/ssh_host_ed25519_key",
        "/etc/tm-sidecar/keys/ssh_host_rsa_key",
    ]
    assert r.arg_values("--trusted-user-ca-keys") == ["/etc/tm-sidecar/auth/trusted_user_ca_keys"]
    assert r.arg_values("--monitord-private-key") == ["/etc/tm-sidecar/keys/monitord_rsa"]
    names = {v["secret"]["secretName"] for v in r.pod_spec["volumes"] if "secret" in v}
    assert names == {"one-keys-from-keygen"}
    assert "one-keys-from-keygen" in r.notes


def test_monitord_encryption_wiring():
    r = rendered("loadbalancer")
    cm = r.one("ConfigMap")["data"]["monitord.conf"]
    assert 'PUBKEY          = "/run/one/tm-sidecar/monitord_rsa.pub"' in cm
    assert 'PRIKEY          = "/etc/one/monitord-keys/monitord_rsa"' in cm
    oned_mounts = {m["mountPath"]: m for m in r.container("oned")["volumeMounts"]}
    assert oned_mounts["/etc/one/monitord-keys"]["readOnly"] is True
    script = r.container("install-keys")["command"][2]
    assert "ssh-keygen -e -m PEM -f /etc/tm-sidecar/keys/monitord_rsa" in script
    assert "/run/one/tm-sidecar/monitord_rsa.pub" in script
    plain = rendered("default")
    assert plain.arg_values("--monitord-private-key") == []
    assert 'PUBKEY          = ""' in plain.one("ConfigMap")["data"]["monitord.conf"]


# ---------------------------------------------------------------------------------------------
# Optional objects and the helm test


def test_optional_objects_off_by_default():
    kinds = {o["kind"] for o in rendered("default").objects}
    assert not kinds & {"NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor"}


def test_network_policy():
    r = rendered("extras")
    policy = r.one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == r.statefulset["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    hypervisors = policy["ingress"][0]
    assert {(p["port"], p["protocol"]) for p in hypervisors["ports"]} == {(22, "TCP"), (4124, "TCP"), (4124, "UDP")}
    assert [f["ipBlock"]["cidr"] for f in hypervisors["from"]] == ["10.20.0.0/16", "192.0.2.10/32"]
    test_rule = policy["ingress"][1]["from"][0]["podSelector"]["matchLabels"]
    assert r.one("Pod")["metadata"]["labels"].items() >= test_rule.items()
    metrics = policy["ingress"][2]
    assert metrics["ports"] == [{"port": 9124, "protocol": "TCP"}]
    assert metrics["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert policy["ingress"][3] == {"ports": [{"port": 2633, "protocol": "TCP"}]}


def test_pdb_and_service_monitor():
    r = rendered("extras")
    pdb = r.one("PodDisruptionBudget")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": r.statefulset["spec"]["selector"]}
    assert Rendered({"pdb": {"enabled": True, "minAvailable": 1}}).one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    sm = r.one("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    selector = sm["spec"]["selector"]["matchLabels"]
    assert r.headless["metadata"]["labels"].items() >= selector.items()
    assert not r.external["metadata"]["labels"].items() >= selector.items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in r.headless["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert r.pod_spec["terminationGracePeriodSeconds"] == 120
    assert r.arg_values("--shutdown-grace") == ["90"]


def test_helm_test_pod_checks_ssh_and_monitord(r: Rendered):
    pod = r.one("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["image"] == r.sidecar["image"]
    script = container["command"][-1]
    svc = f"{r.external['metadata']['name']}.{NAMESPACE}.svc"
    assert f"svc={svc}\n" in script
    assert 'ssh-keyscan -T 10 -p 22 "$svc"' in script
    for transport in ("--tcp", "--udp"):
        assert (
            f'tm-sidecar monitord-send {transport} --host "$svc" --port 4124 --type BEACON_HOST '
            "--status SUCCESS --host-id=-1 --payload-file /dev/null"
        ) in script
    assert container["command"][:2] == ["bash", "-ec"]
    assert Rendered({"tests": {"enabled": False}}).of_kind("Pod") == []
