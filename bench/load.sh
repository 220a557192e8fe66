#!/usr/bin/env bash
# Load figures for tm-sidecar on loopback: concurrent clients (execs + scp), idle connections,
# a monitord UDP flood (the full-size version of tests/load.rs; see bench/load.py).
# Usage: bench/load.sh [--clients 200] [--execs 20] [--idle 1000] [--idle-seconds 60]
#                      [--udp-mbps 50] [--udp-seconds 60] [--only clients,idle,monitord]
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for p in openssh-client procps; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_if_needed apt-get update
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y --no-install-recommends "${missing[@]}"
fi
cargo build --release --locked --bin tm-sidecar --example ssh_load --example monitord_load
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(ssh -V 2>&1)" >&2
exec python3 bench/load.py "$@"
