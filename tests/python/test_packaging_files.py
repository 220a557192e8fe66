"""keys/ (no key material in git), and the deployment documentation."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Built at run time so this file itself does not look like a key.
PRIVATE_KEY_BLOCK = re.compile("-----BEGIN ([A-Z0-9]+ )*" + "PRIVATE KEY-----")


def test_keys_gitignore_keeps_everything_but_the_readme_out(tmp_path):
    lines = [
        line.strip()
        for line in (REPO / "keys" / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ["*", "!README.md", "!.gitignore"]
    # ask git itself, on a scratch repository with the same keys/.gitignore
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / ".gitignore").write_text((REPO / "keys" / ".gitignore").read_text())
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)

    def ignored(path: str) -> bool:
        run = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "-q", "--no-index", path])
        assert run.returncode in (0, 1)
        return run.returncode == 0

    for path in (
        "keys/ssh_host_ed25519_key",
        "keys/monitord_rsa",
        "keys/authorized_keys",
        "keys/dev/oneadmin_ed25519",
        "keys/prod/ssh_host_ed25519_key.pub",
    ):
        assert ignored(path), path
    assert not ignored("keys/README.md")
    assert not ignored("keys/.gitignore")


def test_no_private_key_in_packaging_files():
    roots = ["charts", "docker", "keys", "docs", "tests/python", ".dockerignore"]
    checked = 0
    for root in roots:
        base = REPO / root
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for path in files:
            if "__pycache__" in path.parts or ".pytest_cache" in path.parts:
                continue
            if path.is_relative_to(REPO / "keys") and path.name not in ("README.md", ".gitignore"):
                continue  # locally generated keys, ignored by git (checked above)
            checked += 1
            text = path.read_text(errors="replace")
            assert not PRIVATE_KEY_BLOCK.search(text), f"{path} contains a private key block"
    assert checked > 10


def test_keys_readme_covers_generation_loading_and_rotation():
    text = (REPO / "keys" / "README.md").read_text()
    for needle in (
        "tm-sidecar keygen --dir",
        "ssh_host_ed25519_key",
        "oneadmin_ed25519",
        "authorized_keys",
        "monitord_rsa.pub",
        "RSA PUBLIC KEY",
        "kubectl -n cloud create secret generic",
        "keys.existingSecret",
        "lookup",
        "known_hosts",
        "Rotating the host key",
    ):
        assert needle in text, needle


def test_deploy_doc_covers_install_hypervisors_config_and_metrics():
    text = (REPO / "docs" / "deploy.md").read_text()
    for needle in (
        "helm install one charts/opennebula",
        "helm test",
        "ssh-keyscan -p 22",
        "authorized_keys",
        'HOSTNAME = "',
        "MONITOR_ADDRESS",
        "ADDRESS         = \"127.0.0.1\"",
        "/metrics",
        "/healthz",
        "/readyz",
        "serviceMonitor.enabled=true",
        "keys/README.md",
    ):
        assert needle in text, needle
