"""Shared helpers for the packaging tests: render charts/opennebula offline with the Helm v4
SDK (helm-python-sdk) and hand the rendered objects to the tests."""

from __future__ import annotations

import base64
import copy
import hashlib
import struct
from pathlib import Path

import helm_python
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "opennebula"
RELEASE = "one"
NAMESPACE = "cloud"
# Kubernetes version the rendered objects are validated against (kubernetes-validate, strict).
KUBE_VERSION = "1.35.0"

SIDECAR_UID = 9869


def public_key_line(seed: str, comment: str) -> str:
    """A well-formed ssh-ed25519 authorized_keys line, derived from `seed` (public data only)."""
    key = hashlib.sha256(seed.encode()).digest()
    algo = b"ssh-ed25519"
    blob = struct.pack(">I", len(algo)) + algo + struct.pack(">I", len(key)) + key
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


ONED_KEY = public_key_line("oned", "oneadmin@frontend")
HYPERVISOR_KEY = public_key_line("hypervisor", "oneadmin@kvm1")
USER_CA_KEY = public_key_line("user-ca", "oneadmin-user-ca")

# The value sets every generic test runs against.
VALUE_SETS: dict[str, dict] = {
    "default": {},
    "loadbalancer": {
        "frontend": {"hostname": "one.example.com"},
        "service": {
            "type": "LoadBalancer",
            "annotations": {"metallb.universe.tf/allow-shared-ip": "one"},
            "loadBalancerClass": "example.com/lb",
            "loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8::/32"],
            "externalTrafficPolicy": "Local",
        },
        "keys": {
            "authorizedKeys": [ONED_KEY, HYPERVISOR_KEY],
            "trustedUserCAKeys": [USER_CA_KEY],
            "monitordEncryption": {"enabled": True},
        },
    },
    "nodeport": {
        "frontend": {"hostname": "one.example.com"},
        "service": {
            "type": "NodePort",
            "externalTrafficPolicy": "Cluster",
            "nodePorts": {"ssh": 30022, "monitordTcp": 30124, "monitordUdp": 30124},
        },
        "keys": {"authorizedKeys": [ONED_KEY]},
    },
    "existingsecret": {
        "keys": {
            "existingSecret": "one-keys-from-keygen",
            "hostKeyNames": ["ssh_host_ed25519_key", "ssh_host_rsa_key"],
            "trustedUserCAKeysInSecret": True,
            "monitordEncryption": {"enabled": True},
        },
    },
    "extras": {
        "frontend": {"hostname": "fe.cloud.example.org"},
        "networkPolicy": {
            "enabled": True,
            "allowedCIDRs": ["10.20.0.0/16", "192.0.2.10/32"],
            "extraIngress": [{"ports": [{"port": 2633, "protocol": "TCP"}]}],
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "pdb": {"enabled": True},
        "persistence": {"home": {"enabled": False}},
        "commonLabels": {"team": "cloud"},
        "commonAnnotations": {"owner": "cloud-team"},
        "terminationGracePeriodSeconds": 120,
        "sidecar": {"shutdownGrace": 90},
    },
}


def load_chart(path: Path = CHART) -> helm_python.Chart:
    return helm_python.Chart.load(str(path))


def render_raw(values: dict, path: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would produce it (offline)."""
    with load_chart(path) as chart:
        return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


def parse(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object of a render (NOTES.txt excluded)."""
    objects = []
    for template, text in sorted(rendered.items()):
        if not template.endswith("NOTES.txt"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


class Rendered:
    """A parsed render with lookup helpers."""

    def __init__(self, values: dict, path: Path = CHART):
        self.values = values
        self.raw = render_raw(values, path)
        self.objects = parse(self.raw)

    @property
    def notes(self) -> str:
        return next(text for name, text in self.raw.items() if name.endswith("NOTES.txt"))

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    # --- the front-end pod ---
    @property
    def statefulset(self) -> dict:
        return self.one("StatefulSet")

    @property
    def pod_spec(self) -> dict:
        return self.statefulset["spec"]["template"]["spec"]

    def container(self, name: str) -> dict:
        spec = self.pod_spec
        found = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
        assert len(found) == 1, name
        return found[0]

    @property
    def sidecar(self) -> dict:
        return self.container("tm-sidecar")

    def arg_values(self, flag: str) -> list[str]:
        """Values given to `flag` in the sidecar args (`--flag value` form)."""
        args = self.sidecar["args"]
        return [args[i + 1] for i, a in enumerate(args) if a == flag]

    # --- Services ---
    @property
    def fullname(self) -> str:
        return self.statefulset["metadata"]["name"]

    @property
    def headless(self) -> dict:
        return self.one("Service", self.fullname + "-headless")

    @property
    def external(self) -> dict:
        return self.one("Service", self.fullname)


_cache: dict[str, Rendered] = {}


def rendered(name: str) -> Rendered:
    if name not in _cache:
        _cache[name] = Rendered(VALUE_SETS[name])
    return _cache[name]


@pytest.fixture(params=sorted(VALUE_SETS))
def r(request) -> Rendered:
    """Each value set, rendered once per session."""
    return rendered(request.param)
