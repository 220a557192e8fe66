#!/usr/bin/env python3
"""Load figures for tm-sidecar on loopback (the full-size version of tests/load.rs).

Three scenarios, each against a fresh release build of the sidecar:

  clients   N concurrent clients, each running M execs (a new OpenSSH connection each, output
            checked) and two small scp transfers (upload in SFTP mode, download with -O, both
            checked by sha256)
  idle      K authenticated connections without any channel held for S seconds
            (examples/ssh_load: russh clients in one process, see its header), a fresh OpenSSH
            login timed every 5 s meanwhile, `echo held` on every tenth connection at the end
  monitord  UDP messages at R MB/s for S seconds, P % of them malformed
            (examples/monitord_load), relayed to its sink, which checks every valid message
            arrives byte-identical

For each: errors (must be 0 for valid work), wall time, the server's CPU time, baseline RSS,
peak RSS (VmHWM from /proc/PID/status), RSS when the load is gone and again 15 s later (the
server hands freed memory back every 10 s). The sidecar gets the MaxStartups room an operator
would give such a load (--max-startups 1000:30:2000 --per-source-max-startups 999): every client
comes from 127.0.0.1.

Started by bench/load.sh, which installs what is missing and builds the release binaries.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
BIN = os.path.join(REL, "tm-sidecar")
SSH_LOAD = os.path.join(REL, "examples", "ssh_load")
UDP_LOAD = os.path.join(REL, "examples", "monitord_load")
ME = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
LOAD_FLAGS = ["--max-startups", "1000:30:2000", "--per-source-max-startups", "999",
              "--max-connections", "4096"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_drops(port):
    want = f":{port:04X}"
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            p = line.split()
            if len(p) > 12 and p[1].endswith(want):
                total += int(p[12])
    return total


class Sidecar:
    """A release tm-sidecar on loopback with its own keys and datastore."""

    def __init__(self, work, name, extra=()):
        self.dir = os.path.join(work, name)
        self.keys = os.path.join(self.dir, "keys")
        subprocess.run([BIN, "keygen", "--no-monitord", "--dir", self.keys], check=True,
                       capture_output=True)
        self.root = os.path.join(self.dir, "datastores")
        os.makedirs(self.root)
        self.key = os.path.join(self.keys, "oneadmin_ed25519")
        self.port, self.admin, self.monitord = free_port(), free_port(), free_port()
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--ssh-listen", f"127.0.0.1:{self.port}",
             "--host-key", os.path.join(self.keys, "ssh_host_ed25519_key"),
             "--authorized-keys", os.path.join(self.keys, "authorized_keys"),
             "--allow-user", ME, "--home", self.dir, "--transfer-root", self.root,
             "--monitord-listen", f"127.0.0.1:{self.monitord}",
             "--admin-listen", f"127.0.0.1:{self.admin}", "--log-format", "json",
             *LOAD_FLAGS, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, "RUST_LOG": "info"})
        deadline = time.time() + 30
        while True:
            try:
                if self.http("/readyz").startswith("ready"):
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{name}: tm-sidecar did not become ready")
            time.sleep(0.05)
        self.opts = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                     "-o", "IdentityAgent=none", "-o", "LogLevel=ERROR",
                     "-o", "ConnectTimeout=60", "-i", self.key]
        self.cpu0 = cpu_seconds(self.proc.pid)

    def http(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=10) as r:
            return r.read().decode()

    def metric(self, name, **labels):
        total = 0.0
        for line in self.http("/metrics").splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def rss(self):
        return kib(self.proc.pid, "VmRSS")

    def hwm(self):
        return kib(self.proc.pid, "VmHWM")

    def cpu(self):
        return cpu_seconds(self.proc.pid) - self.cpu0

    def ssh(self, *args):
        return ["ssh", *self.opts, "-p", str(self.port), f"{ME}@127.0.0.1", *args]

    def scp(self, *args):
        return ["scp", *self.opts, "-P", str(self.port), *args]

    def remote(self, path):
        return f"{ME}@127.0.0.1:{path}"

    def wait_quiet(self, timeout=120):
        deadline = time.time() + timeout
        while (self.metric("tm_sidecar_ssh_connections_active") > 0
               or self.metric("tm_sidecar_ssh_channels_active") > 0):
            if time.time() > deadline:
                raise RuntimeError("connections still open after the load")
            time.sleep(0.1)

    def log_errors(self):
        self.log.flush()
        with open(self.log.name) as f:
            return sum(1 for line in f if '"level":"ERROR"' in line)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def memory_after(s, result):
    """RSS when the load is gone and 15 s later (after the server's 10 s trim interval)."""
    result["rss_after_kib"] = s.rss()
    time.sleep(15)
    result["rss_after_15s_kib"] = s.rss()
    result["peak_rss_kib"] = s.hwm()
    result["server_cpu_s"] = round(s.cpu(), 1)
    result["server_log_errors"] = s.log_errors()


def scenario_clients(work, args):
    s = Sidecar(work, "clients")
    try:
        subprocess.run(s.ssh("true"), check=True, stdin=subprocess.DEVNULL)
        result = {"scenario": "clients", "baseline_rss_kib": s.rss()}
        errors, latencies, lock = [], [], threading.Lock()
        start = threading.Barrier(args.clients)

        def client(i):
            d = os.path.join(work, "clients-local", f"c{i}")
            os.makedirs(d)
            src = os.path.join(d, "up")
            with open(src, "wb") as f:
                f.write(os.urandom(args.transfer_kib << 10))
            digest = sha256(src)
            start.wait()
            mine, errs = [], []
            for j in range(args.execs):
                t = time.perf_counter()
                r = subprocess.run(s.ssh(f"echo c{i}; echo $(({i} * {j}))"), capture_output=True,
                                   stdin=subprocess.DEVNULL)
                mine.append(time.perf_counter() - t)
                if r.returncode != 0 or r.stdout != f"c{i}\n{i * j}\n".encode():
                    errs.append(f"exec {i}/{j}: rc {r.returncode} {r.stderr[:200]!r}")
            remote = os.path.join(s.root, f"c{i}")
            r = subprocess.run(s.scp(src, s.remote(remote)), capture_output=True,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0 or not os.path.exists(remote) or sha256(remote) != digest:
                errs.append(f"upload {i}: rc {r.returncode} {r.stderr[:200]!r}")
            back = os.path.join(d, "back")
            r = subprocess.run(s.scp("-O", s.remote(remote), back), capture_output=True,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0 or not os.path.exists(back) or sha256(back) != digest:
                errs.append(f"download {i}: rc {r.returncode} {r.stderr[:200]!r}")
            with lock:
                latencies.extend(mine)
                errors.extend(errs)

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - t0
        s.wait_quiet()
        lat = sorted(latencies)
        result.update({
            "work": f"{args.clients} clients x ({args.execs} execs + 2 scp of {args.transfer_kib} KiB)",
            "operations": args.clients * (args.execs + 2),
            "errors": len(errors),
            "error_samples": errors[:5],
            "wall_s": round(wall, 1),
            "logins_per_s": round(args.clients * (args.execs + 2) / wall, 1),
            "exec_latency_ms": {"p50": round(1000 * statistics.median(lat), 1),
                                "p95": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1),
                                "max": round(1000 * lat[-1], 1)},
            "server_exec_success": s.metric("tm_sidecar_ssh_exec_completions_total",
                                            **{"class": "success"}),
        })
        memory_after(s, result)
        return result
    finally:
        s.stop()


def scenario_idle(work, args):
    s = Sidecar(work, "idle")
    try:
        subprocess.run(s.ssh("true"), check=True, stdin=subprocess.DEVNULL)
        result = {"scenario": "idle", "baseline_rss_kib": s.rss()}
        p = subprocess.Popen([SSH_LOAD, "--target", f"127.0.0.1:{s.port}", "--key", s.key,
                              "--user", ME, "--count", str(args.idle), "--hold",
                              str(args.idle_seconds)],
                             stdout=subprocess.PIPE, text=True)
        connected = json.loads(p.stdout.readline())
        deadline = time.time() + 60
        while s.metric("tm_sidecar_ssh_connections_active") < connected["connected"]:
            if time.time() > deadline:
                break
            time.sleep(0.1)
        result["rss_held_kib"] = s.rss()
        result["server_connections_while_held"] = s.metric("tm_sidecar_ssh_connections_active")
        fresh, fresh_errors = [], 0
        while p.poll() is None:
            t = time.perf_counter()
            r = subprocess.run(s.ssh("true"), stdin=subprocess.DEVNULL, capture_output=True)
            fresh.append(time.perf_counter() - t)
            fresh_errors += r.returncode != 0
            end = time.time() + 5
            while time.time() < end and p.poll() is None:
                time.sleep(0.1)
        done = json.loads(p.stdout.readline())
        p.wait()
        s.wait_quiet()
        errors = (args.idle - connected["connected"]) + (connected["connected"] - done["alive_after_hold"]) \
            + done["exec_failed"] + fresh_errors
        result.update({
            "work": f"{args.idle} idle connections held {args.idle_seconds:g} s",
            "errors": errors,
            "connect_errors": connected["errors"], "error_kinds": connected["error_kinds"],
            "connect_s": round(connected["connect_seconds"], 2),
            "wall_s": round(connected["connect_seconds"] + args.idle_seconds, 1),
            "alive_after_hold": done["alive_after_hold"],
            "exec_on_held_ok": done["exec_ok"],
            "fresh_logins": len(fresh), "fresh_login_errors": fresh_errors,
            "fresh_login_ms_max": round(1000 * max(fresh), 1) if fresh else None,
            "kib_per_connection": round((result["rss_held_kib"] - result["baseline_rss_kib"])
                                        / max(1, connected["connected"]), 1),
        })
        memory_after(s, result)
        return result
    finally:
        s.stop()


def scenario_monitord(work, args):
    sink = free_port(socket.SOCK_DGRAM)
    s = Sidecar(work, "monitord", ["--monitord-upstream", f"127.0.0.1:{sink}",
                                   "--monitord-rate-limit", "0"])
    try:
        result = {"scenario": "monitord", "baseline_rss_kib": s.rss()}
        r = subprocess.run([UDP_LOAD, "--target", f"127.0.0.1:{s.monitord}", "--sink",
                            f"127.0.0.1:{sink}", "--mbps", str(args.udp_mbps), "--duration",
                            str(args.udp_seconds), "--invalid-percent", str(args.invalid_percent),
                            "--threads", "2", "--json"],
                           capture_output=True, text=True, check=True)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        rejected = {k: s.metric("tm_sidecar_monitord_rejected_total", transport="udp", reason=k)
                    for k in ["unknown_type", "not_base64", "bad_zlib", "bad_host_id",
                              "missing_fields", "rate_limited", "too_large"]}
        result.update({
            "work": f"UDP {out['mb_per_s']:.1f} MB/s ({out['msg_per_s']:.0f} msg/s of ~{out['avg_size']} B, "
                    f"{args.invalid_percent} % malformed) for {out['seconds']:.0f} s",
            "sent_valid": out["sent_valid"], "sent_invalid": out["sent_invalid"],
            "received_valid_at_sink": out["received_valid"],
            "received_foreign_at_sink": out["received_foreign"],
            "errors": out["lost_valid"] + out["received_foreign"] + out["send_errors"],
            "relay_counted_valid": s.metric("tm_sidecar_monitord_messages_total", transport="udp"),
            "relay_rejected": rejected,
            "relay_forwarded": {k: s.metric("tm_sidecar_monitord_forwarded_total", transport="udp",
                                            result=k) for k in ["ok", "dropped", "error"]},
            "kernel_drops_at_relay": udp_drops(s.monitord),
            "wall_s": round(out["seconds"], 1),
        })
        memory_after(s, result)
        return result
    finally:
        s.stop()


def mib(k):
    return f"{k / 1024:.1f}"


def table(results):
    rows = ["| scenario | work | errors | wall s | server CPU s | RSS baseline MiB | peak RSS (VmHWM) MiB | RSS after MiB | after +15 s MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['scenario']} | {r['work']} | {r['errors']} | {r.get('wall_s', '')} | "
                    f"{r['server_cpu_s']} | {mib(r['baseline_rss_kib'])} | {mib(r['peak_rss_kib'])} | "
                    f"{mib(r['rss_after_kib'])} | {mib(r['rss_after_15s_kib'])} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--execs", type=int, default=20)
    ap.add_argument("--transfer-kib", type=int, default=64)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--udp-mbps", type=float, default=50)
    ap.add_argument("--udp-seconds", type=float, default=60)
    ap.add_argument("--invalid-percent", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated scenarios (clients,idle,monitord)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--bin-dir", default=REL, help="where tm-sidecar and examples/ are (target/release)")
    args = ap.parse_args()
    global BIN, SSH_LOAD, UDP_LOAD
    BIN = os.path.join(args.bin_dir, "tm-sidecar")
    SSH_LOAD = os.path.join(args.bin_dir, "examples", "ssh_load")
    UDP_LOAD = os.path.join(args.bin_dir, "examples", "monitord_load")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 65536:
        hard = 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    for b in (BIN, SSH_LOAD, UDP_LOAD):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: run bench/load.sh")
    only = [o for o in args.only.split(",") if o]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.mkdtemp(prefix="tm-load.", dir=shm)
    results = []
    try:
        for name, fn in [("clients", scenario_clients), ("idle", scenario_idle),
                         ("monitord", scenario_monitord)]:
            if only and name not in only:
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            r = fn(work, args)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    sys.exit(1 if any(r["errors"] for r in results) else 0)


if __name__ == "__main__":
    main()
