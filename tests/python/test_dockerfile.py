"""docker/Dockerfile, parsed instruction by instruction (no Docker daemon needed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"

RUNTIME_PACKAGES = {
    "bash", "tar", "coreutils", "findutils", "gawk", "sed", "grep", "qemu-utils", "rsync",
    "file", "openssh-client", "iproute2", "procps", "ca-certificates", "libssl3",
}
EXPOSED = {"22/tcp", "4124/tcp", "4124/udp", "9124/tcp"}


def parse(text: str) -> list[tuple[str, str, list[str]]]:
    """(INSTRUCTION, arguments, comments just above it), continuation lines joined."""
    out = []
    comments: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            if line.startswith("#"):
                comments.append(line.lstrip("# ").rstrip())
            else:
                comments = []
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instruction, _, args = buf.partition(" ")
        out.append((instruction.upper(), args.strip(), comments))
        buf, comments = "", []
    assert not buf, "dangling line continuation"
    return out


@pytest.fixture(scope="module")
def instructions():
    return parse(DOCKERFILE.read_text())


def stages(instructions):
    """Split at FROM: [(from-args, [instructions])]."""
    result = []
    for ins in instructions:
        if ins[0] == "FROM":
            result.append((ins[1], []))
        elif result:
            result[-1][1].append(ins)
    return result


def test_multi_stage_builder_caches_dependencies_and_builds_locked(instructions):
    parts = stages(instructions)
    assert len(parts) >= 2
    builder_from, builder = parts[0]
    assert builder_from == "rust:1-bookworm AS builder"
    runs = [args for ins, args, _ in builder if ins == "RUN"]
    copies = [args for ins, args, _ in builder if ins == "COPY"]
    # the manifest (and the patched russh it points to) first, dependencies are built, then
    # the sources follow
    assert copies[0].split() == ["Cargo.toml", "Cargo.lock", "./"]
    assert copies[1].split() == ["third_party", "./third_party"]
    assert "cargo build --release --locked" in runs[0] and "fn main() {}" in runs[0]
    assert copies[2].split() == ["src", "./src"]
    assert "cargo build --release --locked" in runs[-1]
    order = [(ins, args) for ins, args, _ in builder if ins in ("RUN", "COPY")]
    assert order.index(("COPY", copies[1])) < order.index(("RUN", runs[0]))
    assert order.index(("COPY", copies[2])) > order.index(("RUN", runs[0]))


def test_runtime_is_debian_slim_with_exactly_the_packages(instructions):
    runtime_from, runtime = stages(instructions)[-1]
    assert runtime_from == "debian:bookworm-slim AS runtime"
    installs = [args for ins, args, _ in runtime if ins == "RUN" and "apt-get install" in args]
    assert len(installs) == 1
    command = installs[0].split("apt-get install", 1)[1].split("&&", 1)[0]
    words = shlex.split(command)
    assert "--no-install-recommends" in words
    packages = {w for w in words if not w.startswith("-")}
    assert packages == RUNTIME_PACKAGES
    assert "rm -rf /var/lib/apt/lists/*" in installs[0]


def test_oneadmin_user_and_non_root(instructions):
    _, runtime = stages(instructions)[-1]
    runs = " ".join(args for ins, args, _ in runtime if ins == "RUN")
    assert "groupadd --gid 9869 oneadmin" in runs
    assert re.search(r"useradd --uid 9869 --gid 9869 --home-dir /var/lib/one\b", runs)
    users = [args for ins, args, _ in runtime if ins == "USER"]
    assert users == ["9869:9869"]
    # USER comes before the process definition, numeric so runAsNonRoot can verify it
    names = [ins for ins, _, _ in runtime]
    assert names.index("USER") < names.index("ENTRYPOINT")


def test_expose_with_a_comment_per_port(instructions):
    (expose,) = [(args, comments) for ins, args, comments in instructions if ins == "EXPOSE"]
    ports = expose[0].split()
    assert set(ports) == EXPOSED and len(ports) == len(EXPOSED)
    for port in ports:
        assert any(c.startswith(port + " ") for c in expose[1]), f"no comment for {port}"


def test_entrypoint_healthcheck_env_labels(instructions):
    def exec_form(args: str) -> list[str]:
        assert args.startswith("["), f"not exec form: {args}"
        return json.loads(args)

    (entrypoint,) = [args for ins, args, _ in instructions if ins == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["tm-sidecar", "serve"]
    assert not [args for ins, args, _ in instructions if ins == "CMD"]
    (health,) = [args for ins, args, _ in instructions if ins == "HEALTHCHECK"]
    options, _, cmd = health.partition(" CMD ")
    assert exec_form(cmd.strip()) == ["tm-sidecar", "healthcheck"]
    assert "curl" not in health and "wget" not in health
    envs = [args for ins, args, _ in instructions if ins == "ENV"]
    assert "TM_SIDECAR_LOG_FORMAT=json" in envs
    labels = " ".join(args for ins, args, _ in instructions if ins == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_keys_in_the_image(instructions):
    for ins, args, _ in instructions:
        assert ins != "ADD", "ADD can fetch or unpack anything: use COPY"
        if ins == "COPY":
            sources = [w for w in args.split() if not w.startswith("--")][:-1]
            if "--from=builder" in args:
                assert sources == ["/out/tm-sidecar"]
            else:
                assert set(sources) <= {"Cargo.toml", "Cargo.lock", "third_party", "src"}, sources
        if ins == "RUN":
            assert "ssh-keygen" not in args and "keygen" not in args
    text = DOCKERFILE.read_text()
    assert "PRIVATE KEY" not in text


def test_dockerignore_keeps_keys_and_build_output_out():
    entries = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"target/", "keys/dev", "dev/", ".git"} <= entries
    assert not any(e.startswith("!") for e in entries)
