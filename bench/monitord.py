#!/usr/bin/env python3
"""monitord relay throughput: UDP MONITOR_VM messages through the release sidecar to a sink.

Usage: bench/monitord.sh [--size 1024] [--hosts 100]   (builds the release binary and example)

For each offered rate the load generator (examples/monitord_load.rs) sends realistic messages
to the sidecar's monitord port and counts what reaches the sink the sidecar forwards to (it
plays onemonitord). Reported: messages/s sent and relayed, loss, the sidecar's CPU use, and its
resident memory. The sidecar runs with --monitord-rate-limit 0 since all load comes from one
source address.
"""
import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tm-sidecar")
LOAD = os.path.join(ROOT, "target", "release", "examples", "monitord_load")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_DGRAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="bytes per message on the wire")
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--plan", default="20000:30,50000:10,100000:10,125000:10,150000:10",
                    help="RATE:SECONDS,... (rate 0 = as fast as two sender threads go)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="tm-bench-monitord-")
    keys = os.path.join(work, "keys")
    subprocess.run([BIN, "keygen", "--no-monitord", "--dir", keys], check=True, capture_output=True)
    listen, sink = free_port(), free_port()
    side = subprocess.Popen(
        [BIN, "serve", "--ssh-listen", "127.0.0.1:0",
         "--host-key", os.path.join(keys, "ssh_host_ed25519_key"),
         "--authorized-keys", os.path.join(keys, "authorized_keys"),
         "--home", work, "--transfer-root", work, "--admin-listen", "off",
         "--monitord-listen", f"127.0.0.1:{listen}", "--monitord-upstream", f"127.0.0.1:{sink}",
         "--monitord-rate-limit", "0", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        time.sleep(0.5)
        if side.poll() is not None:
            sys.exit("the sidecar did not start")
        rows = []
        for step in args.plan.split(","):
            rate, seconds = (int(x) for x in step.split(":"))
            cpu0 = cpu_seconds(side.pid)
            t0 = time.perf_counter()
            out = subprocess.run(
                [LOAD, "--target", f"127.0.0.1:{listen}", "--sink", f"127.0.0.1:{sink}",
                 "--rate", str(rate), "--duration", str(seconds), "--size", str(args.size),
                 "--hosts", str(args.hosts), "--threads", "2" if rate == 0 else "1"],
                check=True, capture_output=True, text=True).stdout
            wall = time.perf_counter() - t0
            cpu = (cpu_seconds(side.pid) - cpu0) / wall * 100
            sent = re.search(r"sent (\d+) messages .* in ([\d.]+) s", out)
            got = re.search(r"received (\d+) at the sink: loss (\d+) \(([\d.]+) %\)", out)
            n_sent, secs = int(sent.group(1)), float(sent.group(2))
            n_got, lost, pct = int(got.group(1)), int(got.group(2)), float(got.group(3))
            row = (f"{rate:,}/s" if rate else "max (2 senders)", seconds, f"{n_sent / secs:,.0f}",
                   f"{n_got / secs:,.0f}", f"{lost:,} ({pct:.3f} %)", f"{cpu:.0f} %",
                   f"{rss_kib(side.pid) / 1024:.1f}")
            rows.append(row)
            print("# " + " | ".join(str(c) for c in row), flush=True)
        print()
        print(f"messages of ~{args.size} bytes from {args.hosts} hosts; peak RSS "
              f"{hwm_kib(side.pid) / 1024:.1f} MiB")
        print()
        print("| offered | seconds | sent msg/s | relayed msg/s | lost | sidecar CPU | RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
    finally:
        side.terminate()
        side.wait(10)


if __name__ == "__main__":
    main()
