#!/usr/bin/env bash
# Benchmarks tm-sidecar against a stock OpenSSH sshd on loopback, side by side in one run.
# Usage: bench/run.sh [--size-mib 2048] [--parallel-mib 256] [--rounds 5] [--only PREFIX,...]
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for p in openssh-server openssh-client procps; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_if_needed apt-get update
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y --no-install-recommends "${missing[@]}"
fi
cargo build --release --locked
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(ssh -V 2>&1)"
exec python3 bench/bench.py "$@"
