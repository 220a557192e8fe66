#!/usr/bin/env bash
# Run every test of tm-sidecar: installs what the tests need (Debian packages, Python packages),
# then runs `cargo test` (unit + integration tests against the real binary and the real OpenSSH
# tools) and the chart/Dockerfile tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# OpenSSH client tools drive the server; openssh-server is the stock sshd that plays the
# hypervisor and the reference; rsync/qemu-utils/tar/xorriso are what OpenNebula's scripts call
# (tests/tm_replay.rs); e2fsprogs gives chattr (a file rm cannot remove, for the delete retries);
# mount mounts the small tmpfs of the full-disk tests (tests/faults.rs, run as root);
# libssl-dev and pkg-config build the OpenSSL binding of the patched russh (third_party/russh);
# dropbear-bin and putty-tools are the non-OpenSSH clients of tests/interop.rs.
debs=(openssh-client openssh-server rsync qemu-utils tar coreutils findutils procps iproute2 file
  xorriso e2fsprogs mount libssl-dev pkg-config dropbear-bin putty-tools)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_if_needed apt-get update
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y --no-install-recommends "${missing[@]}"
fi

python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo test --locked
python3 -m pytest -q tests/python
