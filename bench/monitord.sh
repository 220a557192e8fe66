#!/usr/bin/env bash
# monitord relay throughput through the release build (see bench/monitord.py for the options).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tm-sidecar --example monitord_load
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
exec python3 bench/monitord.py "$@"
